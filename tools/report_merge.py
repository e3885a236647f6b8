"""One merged report out of every facility's structured entries (pure: no I/O).

A patient treated at three places has three partial records that repeat
each other: the GP and the hospital both list the diabetes. The clinician
wants one list, and must still see who said what, so merging keeps every
source and never picks a winner silently.

Rules, section by section (``SECTIONS``):

- **Key.** Entries are the same thing when (section, code_system, code)
  match; the same code under two systems stays two rows (a SNOMED code and
  a LOINC code with equal digits are unrelated). An entry without a code is
  keyed by its display text. Encounters, procedures and immunisations are
  *events*: their key adds the day, so two check-ups are two rows while one
  vaccination recorded by the GP and the hospital is one row.
- **Sources.** A row lists each facility once, with that facility's own
  newest entry (date, status, value); older entries of the same key at the
  same facility are left out and counted in ``Row.earlier``.
- **Results** (lab tests, vital signs) show only the latest result per
  code: its sources are the facilities holding that same latest result;
  every other result of the code, at any facility, is counted in ``earlier``.
- **Status.** The row's status, date and value are those of its newest
  source; ``Row.statuses_differ`` says when facilities disagree (active at
  one, resolved at another), and the sources show who says what.
- **Medication** shows prescriptions active at some facility (``active``,
  ``on-hold``, ``unknown`` or no status); the row then lists every source,
  stopped ones included, so a conflict stays visible.
- ``entered-in-error`` entries are dropped everywhere: the facility itself
  says they are wrong.
- **Order.** Newest first within a section; entries without a (readable)
  date sort last. Dates are ISO 8601 of any precision; a date without a
  time zone is taken as UTC.
- **Recent.** ``recent_limit`` keeps only the newest N rows of encounters
  and procedures and counts the rest in ``Section.omitted``. ``merge``
  keeps everything by default (JSON and FHIR output); the terminal view
  passes ``RECENT_ROWS``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

SECTIONS: tuple[str, ...] = (
    "problems",
    "medication",
    "allergies",
    "results",
    "encounters",
    "procedures",
    "immunisations",
)
#: Sections of things that happen on a day, rather than states that hold.
EVENT_SECTIONS = frozenset({"encounters", "procedures", "immunisations"})
#: Sections the terminal shows only the newest rows of.
RECENT_SECTIONS = frozenset({"encounters", "procedures"})
#: Rows of each recent section a terminal table shows (``transmural report --all``: every one).
RECENT_ROWS = 20
#: A prescription with one of these statuses at some facility is shown.
ACTIVE_MEDICATION = frozenset({"active", "on-hold", "unknown", ""})
DROPPED_STATUSES = frozenset({"entered-in-error"})


class ItemLike(Protocol):
    """What merging reads of one entry (``tools.gateway_client.ClinicalItem``)."""

    @property
    def section(self) -> str: ...
    @property
    def code_system(self) -> str: ...
    @property
    def code(self) -> str: ...
    @property
    def display(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def date(self) -> str: ...
    @property
    def value(self) -> str: ...
    @property
    def unit(self) -> str: ...
    @property
    def resource_id(self) -> str: ...
    @property
    def resource_json(self) -> bytes: ...


class FacilityLike(Protocol):
    """What merging reads of one facility's answer (``tools.gateway_client.FacilityItems``)."""

    @property
    def node_id(self) -> str: ...
    @property
    def organisation(self) -> str: ...
    @property
    def organisation_id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def elapsed_ms(self) -> int: ...
    @property
    def items(self) -> Sequence[ItemLike]: ...


@dataclass(frozen=True, slots=True)
class Source:
    """One facility's entry behind a row, with its own date, status and value."""

    node_id: str
    organisation: str
    organisation_id: str
    date: str
    status: str
    value: str
    unit: str
    display: str
    resource_id: str
    resource_json: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Row:
    """One problem, medication, result...: the newest source's view, and all sources."""

    section: str
    code_system: str
    code: str
    display: str
    status: str
    date: str
    value: str
    unit: str
    sources: tuple[Source, ...]
    earlier: int = 0  # entries of this key left out: older, or (results) not the latest

    @property
    def statuses_differ(self) -> bool:
        return len({s.status for s in self.sources}) > 1


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    rows: tuple[Row, ...]
    omitted: int = 0  # rows past ``recent_limit``


@dataclass(frozen=True, slots=True)
class FacilitySummary:
    """A header line: how one facility answered."""

    node_id: str
    organisation: str
    organisation_id: str
    status: str
    message: str
    elapsed_ms: int
    items: int


@dataclass(frozen=True, slots=True)
class Report:
    facilities: tuple[FacilitySummary, ...]
    sections: tuple[Section, ...]
    patient: str = ""
    correlation_id: str = ""
    #: Why the facilities asked may not be all (registry unreachable); "" when they are.
    incomplete: str = ""

    def section(self, name: str) -> Section:
        for section in self.sections:
            if section.name == name:
                return section
        return Section(name, ())


_Key = tuple[str, str]  # (code_system, code), the code carrying the day for events


def merge(
    results: Iterable[FacilityLike],
    *,
    recent_limit: int | None = None,
    patient: str = "",
    correlation_id: str = "",
    incomplete: str = "",
) -> Report:
    """Merge every facility's entries; facilities keep the order they answered in."""
    answers = list(results)
    grouped: dict[str, dict[_Key, dict[str, list[tuple[FacilityLike, ItemLike]]]]] = {}
    for answer in answers:
        for item in answer.items:
            if item.status in DROPPED_STATUSES:
                continue
            section = item.section or "other"
            by_key = grouped.setdefault(section, {}).setdefault(_key(section, item), {})
            by_key.setdefault(answer.node_id, []).append((answer, item))
    names = [*SECTIONS, *sorted(set(grouped) - set(SECTIONS))]
    return Report(
        facilities=tuple(_summary(a) for a in answers),
        sections=tuple(_section(n, grouped.get(n, {}), recent_limit) for n in names),
        patient=patient,
        correlation_id=correlation_id,
        incomplete=incomplete,
    )


def instant(text: str) -> datetime | None:
    """An ISO 8601 date of any precision as a UTC datetime; None if absent or unreadable."""
    text = text.strip()
    if len(text) == 4 and text.isdigit():
        text += "-01-01"
    elif len(text) == 7 and text[4] == "-":
        text += "-01"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def newest_first(date: str) -> tuple[bool, float]:
    """Sort key: newest first, then everything without a readable date."""
    moment = instant(date)
    return (moment is None, -moment.timestamp() if moment else 0.0)


def _key(section: str, item: ItemLike) -> _Key:
    code = item.code or f"text:{item.display.strip().lower()}"
    if section in EVENT_SECTIONS:
        moment = instant(item.date)
        code += f"@{moment.date().isoformat() if moment else item.date}"
    return (item.code_system, code)


def _section(
    name: str,
    keyed: dict[_Key, dict[str, list[tuple[FacilityLike, ItemLike]]]],
    recent_limit: int | None,
) -> Section:
    rows = [_row(name, per_facility) for per_facility in keyed.values()]
    if name == "medication":
        rows = [r for r in rows if any(s.status in ACTIVE_MEDICATION for s in r.sources)]
    rows.sort(key=lambda r: (*newest_first(r.date), r.display.lower(), r.code_system, r.code))
    if recent_limit is not None and name in RECENT_SECTIONS and len(rows) > recent_limit:
        return Section(name, tuple(rows[:recent_limit]), len(rows) - recent_limit)
    return Section(name, tuple(rows))


def _row(section: str, per_facility: dict[str, list[tuple[FacilityLike, ItemLike]]]) -> Row:
    everything = sum(len(entries) for entries in per_facility.values())
    sources = [
        _source(*min(entries, key=lambda e: newest_first(e[1].date)))
        for entries in per_facility.values()
    ]
    sources.sort(key=lambda s: (*newest_first(s.date), s.node_id))
    if section == "results":
        latest = newest_first(sources[0].date)
        sources = [s for s in sources if newest_first(s.date) == latest]
    newest = sources[0]
    first = next(iter(per_facility.values()))[0][1]
    return Row(
        section=section,
        code_system=first.code_system,
        code=first.code,
        display=next((s.display for s in sources if s.display), ""),
        status=newest.status,
        date=newest.date,
        value=newest.value,
        unit=newest.unit,
        sources=tuple(sources),
        earlier=everything - len(sources),
    )


def _source(answer: FacilityLike, item: ItemLike) -> Source:
    return Source(
        node_id=answer.node_id,
        organisation=answer.organisation,
        organisation_id=answer.organisation_id,
        date=item.date,
        status=item.status,
        value=item.value,
        unit=item.unit,
        display=item.display,
        resource_id=item.resource_id,
        resource_json=item.resource_json,
    )


def _summary(answer: FacilityLike) -> FacilitySummary:
    return FacilitySummary(
        node_id=answer.node_id,
        organisation=answer.organisation,
        organisation_id=answer.organisation_id,
        status=answer.status,
        message=answer.message,
        elapsed_ms=answer.elapsed_ms,
        items=len(answer.items),
    )
