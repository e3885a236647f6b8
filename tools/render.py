"""How search results look in a terminal and in JSON.

The JSON shape is stable for scripts:

    {"patient": str, "correlation_id": str,
     "facilities": [{"node_id", "organisation", "status", "message",
                     "elapsed_ms", "documents": [{"document_id", "title",
                     "type_code", "type_display", "content_type", "size",
                     "sha256", "created", "author_organisation"}]}]}
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tools.gateway_client import FacilityResult, Holders


def facility_line(result: FacilityResult) -> str:
    """One line per facility, printed the moment it answers."""
    detail = _count(len(result.documents), "document") if result.status == "ok" else result.message
    return (
        f"  {result.status:<15} {result.node_id:<10} {_cut(result.organisation, 36):<36} "
        f"{result.elapsed_ms:>6} ms  {detail}".rstrip()
    )


def holders_line(holders: Holders) -> str:
    if not holders.node_ids:
        return "No facility in the network knows this patient."
    count = len(holders.node_ids)
    verb = "holds" if count == 1 else "hold"
    return f"{_count(count, 'facility', 'facilities')} {verb} data on this patient; asking:"


def documents_table(results: list[FacilityResult], limit: int | None = None) -> list[str]:
    """Documents of every answering facility, newest first."""
    rows = [(r.node_id, d) for r in results for d in r.documents]
    rows.sort(key=lambda row: row[1].created, reverse=True)
    if not rows:
        return []
    lines = [f"  {'facility':<10} {'date':<10} {'type':<30} {'size':>8}  document id"]
    shown = rows if limit is None else rows[:limit]
    for node_id, d in shown:
        kind = d.type_display or d.title
        lines.append(
            f"  {node_id:<10} {d.created[:10]:<10} {_cut(kind, 30):<30} "
            f"{_size(d.size):>8}  {d.document_id}"
        )
    if len(shown) < len(rows):
        lines.append(f"  ... and {len(rows) - len(shown)} more (use --json for all)")
    return lines


def search_json(identifier: str, holders: Holders | None, results: list[FacilityResult]) -> Any:
    return {
        "patient": identifier,
        "correlation_id": holders.correlation_id if holders else "",
        "facilities": [dataclasses.asdict(r) for r in results],
    }


def _count(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
