"""How search results look in a terminal and in JSON, and the client's progress displays.

The JSON shape is stable for scripts (``--type/--since/--until`` leave out
the documents they filter, nothing else changes):

    {"patient": str, "correlation_id": str,
     "facilities": [{"node_id", "organisation", "status", "message",
                     "elapsed_ms", "documents": [{"document_id", "title",
                     "type_code", "type_display", "content_type", "size",
                     "sha256", "created", "author_organisation"}]}]}

Progress (``LiveStatus``, ``FetchProgress``) is drawn with rich only on a
terminal; into a pipe or a log file the client writes plain lines, or
nothing, because redraw codes there are noise.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from datetime import date
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from tools.gateway_client import Document, FacilityItems, FacilityResult, Holders

#: Documents at least this large get a progress bar while fetched (on a terminal).
FETCH_PROGRESS_BYTES = 1024 * 1024
#: Widest the facility (node id) column grows; longer ids are cut with "…".
NODE_COLUMN_MAX = 24
#: How often a live display redraws, per second.
REFRESH_PER_SECOND = 8


def node_width(node_ids: Iterable[str]) -> int:
    """The facility column's width: the longest node id, 10 to NODE_COLUMN_MAX."""
    return min(max([10, *(len(n) for n in node_ids)]), NODE_COLUMN_MAX)


def facility_line(result: FacilityResult | FacilityItems, width: int = 10) -> str:
    """One line per facility, printed the moment it answers; ``width``: see ``node_width``."""
    if result.status != "ok":
        detail = result.message
    elif isinstance(result, FacilityItems):
        detail = counted(len(result.items), "entry", "entries")
    else:
        detail = counted(len(result.documents), "document")
    if result.status == "ok" and result.message:  # e.g. the registry was unreachable
        detail = f"{detail} ({result.message})"
    # Names and messages come from the network: escaped, they cannot drive the terminal.
    return printable(
        f"  {result.status:<15} {_cut(result.node_id, width):<{width}} "
        f"{_cut(result.organisation, 36):<36} "
        f"{result.elapsed_ms:>6} ms  {detail}".rstrip()
    )


class LiveStatus:
    """Each facility's status while the fan-out runs.

    On a terminal: one line per holder, "waiting" with a running clock until
    it answers, redrawn in place (rich ``Live``); what stays on screen at the
    end is the final line of each. Elsewhere: the plain lines of
    ``holders_line`` and ``facility_line`` as answers come in. ``out=None``
    shows nothing (JSON on stdout with no terminal to draw on).
    """

    def __init__(self, out: TextIO | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._out = out
        self._console = Console(file=out, highlight=False) if out is not None else None
        self._clock = clock
        self._started = clock()
        self._waiting: dict[str, str] = {}  # node id -> organisation
        self._width = 10  # of the facility column, once the holders are known
        self._lines: list[str] = []
        self._live: Live | None = None

    @property
    def live(self) -> bool:
        return self._console is not None and self._console.is_terminal

    def __enter__(self) -> LiveStatus:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def located(self, holders: Holders) -> None:
        self._waiting = dict(zip(holders.node_ids, holders.organisations, strict=False))
        self._width = node_width(holders.node_ids)
        if self._console is None or self._out is None:
            return
        if not self.live:
            print(holders_line(holders), file=self._out, flush=True)
            return
        self._console.print(Text(holders_line(holders)))  # text, not rich markup
        if holders.node_ids:
            self._live = Live(
                console=self._console, get_renderable=self._render, transient=False,
                refresh_per_second=REFRESH_PER_SECOND,
            )  # fmt: skip
            self._live.start()

    def answered(self, result: FacilityResult | FacilityItems) -> None:
        self._waiting.pop(result.node_id, None)
        self._lines.append(facility_line(result, self._width))
        if self._live is not None:
            self._live.refresh()
        elif self._out is not None:
            print(self._lines[-1], file=self._out, flush=True)

    def _render(self) -> Group:
        s = self._clock() - self._started
        w = self._width
        waiting = [
            Text(
                printable(
                    f"  {'waiting':<15} {_cut(node, w):<{w}} {_cut(org, 36):<36} {s:>6.1f} s"
                ),
                "dim",
            )
            for node, org in self._waiting.items()
        ]
        return Group(*(Text(line) for line in self._lines), *waiting)


class FetchProgress:
    """A progress bar on a terminal's stderr for a large document; silent otherwise."""

    def __init__(self, label: str, stream: TextIO, threshold: int = FETCH_PROGRESS_BYTES) -> None:
        self._label = label
        self._console = Console(file=stream)
        self._threshold = threshold
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, received: int, expected: int) -> None:
        if self._bar is None:
            if expected < self._threshold or not self._console.is_terminal:
                return
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), console=self._console, transient=True,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(self._label, total=expected)
        assert self._task is not None
        self._bar.update(self._task, completed=received)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


@dataclasses.dataclass(frozen=True, slots=True)
class DocumentFilter:
    """``search --type TEXT --since DATE --until DATE``; both dates inclusive."""

    type_text: str = ""
    since: date | None = None
    until: date | None = None

    @property
    def active(self) -> bool:
        return bool(self.type_text) or self.since is not None or self.until is not None

    def keeps(self, d: Document) -> bool:
        """Type: a case-insensitive substring of its type display, type code or title.

        A document without a readable date is left out once a date bound is set.
        """
        text = self.type_text.casefold()
        if text and not any(text in f.casefold() for f in (d.type_display, d.type_code, d.title)):
            return False
        if self.since is None and self.until is None:
            return True
        try:
            day = date.fromisoformat(d.created[:10])
        except ValueError:
            return False
        return (self.since is None or day >= self.since) and (
            self.until is None or day <= self.until
        )

    def apply(self, results: list[FacilityResult]) -> list[FacilityResult]:
        return [
            dataclasses.replace(r, documents=[d for d in r.documents if self.keeps(d)])
            for r in results
        ]

    def describe(self) -> str:
        parts = [f"type contains {self.type_text!r}"] if self.type_text else []
        parts += [f"since {self.since}"] if self.since else []
        parts += [f"until {self.until}"] if self.until else []
        return ", ".join(parts)


def holders_line(holders: Holders) -> str:
    """Who will be asked, after a warning when that list may not be all."""
    if holders.node_ids:
        count = len(holders.node_ids)
        verb = "holds" if count == 1 else "hold"
        line = f"{counted(count, 'facility', 'facilities')} {verb} data on this patient; asking:"
    else:
        line = "No facility in the network knows this patient."
    return f"Warning: {printable(holders.incomplete)}.\n{line}" if holders.incomplete else line


def documents_table(results: list[FacilityResult], limit: int | None = None) -> list[str]:
    """Documents of every answering facility, newest first."""
    rows = [(r.node_id, d) for r in results for d in r.documents]
    rows.sort(key=lambda row: row[1].created, reverse=True)
    if not rows:
        return []
    w = node_width(node_id for node_id, _ in rows)
    lines = [f"  {'facility':<{w}} {'date':<10} {'type':<30} {'size':>8}  document id"]
    shown = rows if limit is None else rows[:limit]
    for node_id, d in shown:
        kind = d.type_display or d.title
        lines.append(
            f"  {_cut(node_id, w):<{w}} {d.created[:10]:<10} {_cut(kind, 30):<30} "
            f"{_size(d.size):>8}  {d.document_id}"
        )
    if len(shown) < len(rows):
        lines.append(f"  ... and {len(rows) - len(shown)} more (use --json for all)")
    return lines


def search_json(identifier: str, holders: Holders | None, results: list[FacilityResult]) -> Any:
    return {
        "patient": identifier,
        "correlation_id": holders.correlation_id if holders else "",
        "incomplete": holders.incomplete if holders else "",
        "facilities": [dataclasses.asdict(r) for r in results],
    }


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``): a name from a
    file or the network must not fake a line or drive the terminal."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def counted(n: int, word: str, plural: str = "") -> str:
    """A count as people write it: 1 bundle, 2 bundles (``plural`` when not word + s)."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
