"""``transmural-admin ingest``: load FHIR R4 bundles into a node, showing progress.

Output contract (``tools/devnet.py`` shows the last line of the ingest log):
stdout holds one summary line per folder given, once all are loaded,

    N bundles from PATH: P patients, R resources, D documents[; K refused][; skipped ...]

and one for the files given (``... from PATH`` for one, ``from K files`` for
several: a shell glob of a thousand bundles is loaded as one batch, on every
core, and audited once), and, when there was more than one such line, a last
line of the same form totalling them (``... from 2 paths in total: ...``).
Each refused file is named on stderr with why (``refused: PATH: reason``)
the moment it is refused.

Progress goes to stderr: a bar with bundles/s on a terminal; otherwise
(a log file, a pipe) a plain line every ``PLAIN_PROGRESS_S`` seconds, so a
long ingest into a log still shows it is moving.

Bundles go through ``node.ingest.ingest_each``: progress is per bundle
written, while the next bundles are prepared on the other cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from node.config import NodeConfig
from node.ingest import bundle_files, ingest_each
from node.records import IngestReport
from node.store import NodeStore
from tools.admin_audit import record_local
from tools.render import counted, printable
from transmural.errors import InvalidBundle, InvalidInput
from transmural.pseudonym import Pseudonymiser, read_network_key

#: Without a terminal, how often a plain progress line is written.
PLAIN_PROGRESS_S = 10.0


@dataclass
class _Batch:
    """One folder given, or the files given: its bundle files, and what became of them."""

    label: str  # as the summary names it
    folder: Path  # as the audit names it: never a file name, which may be a patient's name
    is_dir: bool
    files: list[Path]
    reports: list[IngestReport] = field(default_factory=list)
    refused: list[InvalidBundle] = field(default_factory=list)


async def ingest(
    config_path: Path, paths: list[Path], out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Load each file or folder; 1 if any bundle was refused (each is named), else 0."""
    out, err = out or sys.stdout, err or sys.stderr
    config = NodeConfig.load(config_path)
    pseudonymiser = Pseudonymiser(read_network_key(config.network_key_file))
    planned = await asyncio.to_thread(_plan, paths)
    # A joined node's database exists since join (an --insecure-dev one may start here).
    store = await NodeStore.open(
        config.database, existing=not config.insecure_dev, node=config.identity
    )
    try:
        with _Progress(sum(len(p.files) for p in planned), err) as progress:
            for item in planned:
                if not item.files:  # a folder with no bundles: nothing to load or audit
                    progress.say(f"refused: {item.refused[0]}")
                    continue
                # Recorded first: an ingest killed half-way still left its trace.
                await _audit_start(store, item)
                await _ingest_batch(store, item, pseudonymiser, config.national_system, progress)
                await _audit_ingest(store, item.folder, item.reports, item.refused)
        for item in planned:
            skipped = await asyncio.to_thread(_skipped, item.folder) if item.is_dir else ""
            print(printable(_summary(item.label, item.reports, item.refused) + skipped), file=out)
        if len(planned) > 1:
            every = [r for p in planned for r in p.reports]
            refused = [r for p in planned for r in p.refused]
            print(printable(_summary(f"{len(planned)} paths in total", every, refused)), file=out)
        out.flush()
    finally:
        await store.close()
    return 1 if any(p.refused for p in planned) else 0


async def _ingest_batch(
    store: NodeStore,
    item: _Batch,
    pseudonymiser: Pseudonymiser,
    national_system: str,
    progress: _Progress,
) -> None:
    """Ingest one batch's files, noting each report or refusal on ``item`` as it comes."""
    results = ingest_each(store, item.files, pseudonymiser, national_system)
    async with contextlib.aclosing(results):
        async for file, result in results:
            if isinstance(result, InvalidBundle):
                item.refused.append(result)
                given = item.folder if item.is_dir else file
                progress.say(f"refused: {_named(result, given, item.is_dir)}")
            else:
                item.reports.append(result)
            progress.advance()


def _plan(paths: list[Path]) -> list[_Batch]:
    """A batch per folder given, then one for all the files given.

    A folder with no bundles is refused on its own (named, the rest loaded).
    """
    paths = _once_each(paths)
    batches = [_folder_batch(p) for p in paths if p.is_dir()]
    files = [p for p in paths if not p.is_dir()]
    if len(files) == 1:
        batches.append(_Batch(str(files[0]), files[0].parent, False, files))
    elif files:
        common = Path(os.path.commonpath([os.path.abspath(f.parent) for f in files]))
        batches.append(_Batch(f"{len(files)} files", common, False, files))
    return batches


def _once_each(paths: list[Path]) -> list[Path]:
    """The paths as given, each file or folder once (a folder given twice is loaded once)."""
    seen: set[Path] = set()
    kept = []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


def _folder_batch(folder: Path) -> _Batch:
    try:
        return _Batch(str(folder), folder, True, bundle_files(folder))
    except InvalidInput as empty:
        return _Batch(str(folder), folder, True, [], refused=[InvalidBundle(str(empty))])


def _summary(source: str, reports: list[IngestReport], refused: list[InvalidBundle]) -> str:
    """The summary line (module doc); patients are counted once however many bundles hold them."""
    patients = len(frozenset().union(*(r.patient_keys for r in reports)))
    new = sum(r.new_patients for r in reports)
    unindexed = len(frozenset().union(*(r.unindexed_keys for r in reports)))
    kept = sum(r.kept_identifiers for r in reports)
    return (
        f"{counted(len(reports), 'bundle')} from {source}: {counted(patients, 'patient')}"
        + ("" if new == patients else f" ({new} new to this node)")
        + f", {counted(sum(r.resources for r in reports), 'resource')}"
        + f", {counted(sum(r.documents for r in reports), 'document')}"
        + (f"; {len(refused)} refused" if refused else "")
        + (
            f"; {counted(kept, 'patient')} kept the national identifier known here "
            "(their bundle had none)"
            if kept
            else ""
        )
        + (
            f"; {counted(unindexed, 'patient')} without a national identifier: not indexed, "
            "no other facility can find them"
            if unindexed
            else ""
        )
    )


class _Progress:
    """A rich bar with bundles/s on a terminal; a plain line now and then otherwise."""

    def __init__(
        self, total: int, stream: TextIO, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream, self._clock, self._total = stream, clock, total
        self._done = 0
        self._started = self._last_line = clock()
        console = Console(file=stream, highlight=False)
        self._bar: Progress | None = None
        if console.is_terminal:
            self._bar = Progress(
                TextColumn("ingest"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} bundles/s"), TimeElapsedColumn(),
                console=console, transient=True,
            )  # fmt: skip
            self._task = self._bar.add_task("ingest", total=total, rate="-")

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def say(self, line: str) -> None:
        line = printable(line)  # a file name may hold a newline or a terminal escape
        if self._bar is not None:
            self._bar.console.print(line, markup=False)
        else:
            print(line, file=self._stream, flush=True)

    def advance(self) -> None:
        self._done += 1
        now = self._clock()
        rate = self._done / max(now - self._started, 1e-6)
        if self._bar is not None:
            self._bar.update(self._task, completed=self._done, rate=f"{rate:.1f}")
        elif now - self._last_line >= PLAIN_PROGRESS_S:
            self._last_line = now
            print(
                f"ingest: {self._done}/{self._total} bundles, {rate:.1f} bundles/s",
                file=self._stream, flush=True,
            )  # fmt: skip


def _named(problem: InvalidBundle, path: Path, is_dir: bool) -> str:
    """The error with the path as the user gave it: errors name only the file."""
    text = str(problem)
    if text.startswith(str(path)):
        return text
    if is_dir:
        return os.path.join(path, text)
    if text.startswith(f"{path.name}:"):
        return str(path) + text.removeprefix(path.name)
    return f"{path}: {text}"


def _skipped(folder: Path) -> str:
    """``; skipped ...`` for what ingest passes over (as ``node.ingest`` chooses), or ""."""
    folders = files = 0
    for entry in folder.iterdir():
        if entry.is_dir():
            folders += 1
        elif entry.suffix.lower() != ".json" or entry.name.startswith("."):
            files += 1
    parts = [f"{counted(files, 'file')} not *.json or hidden"] if files else []
    parts += [counted(folders, "sub-folder")] if folders else []
    return f"; skipped {' and '.join(parts)}" if parts else ""


async def _audit_start(store: NodeStore, item: _Batch) -> None:
    """An ingest is about to write: which folder, how many files (no patient data)."""
    reason = f"{counted(len(item.files), 'bundle file')} from {item.folder}"
    await record_local(store, "ingest-start", reason)


async def _audit_ingest(
    store: NodeStore, path: Path, reports: list[IngestReport], refused: list[InvalidBundle]
) -> None:
    """One audit record per ingest run: what came in, what was refused (no patient data)."""
    patients = sum(r.patients for r in reports)
    reason = f"{counted(len(reports), 'bundle')} ({counted(patients, 'patient')}) from {path}"
    reason += f"; {len(refused)} refused" if refused else ""
    await record_local(store, "ingest", reason, "error" if refused else "granted")
