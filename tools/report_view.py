"""How a merged report looks: terminal tables, JSON for scripts, a FHIR R4 Bundle.

**Tables** (``print_tables``): a header table of facilities (status, time,
entries or why not), then one table per section. On a terminal they are
drawn with colour; piped or redirected, the same tables come out in plain
ASCII at a fixed width, so ``grep`` and ``less`` work.

**JSON** (``report_json``, ``transmural report --json``). Stable: keys are
only ever added, and ``schema_version`` goes up when a key changes meaning.
Every section is present, empty or not::

    {"schema_version": 1, "patient": str, "correlation_id": str,
     "facilities": [{"node_id", "organisation", "organisation_id", "status",
                     "message", "elapsed_ms", "items"}],
     "sections": {"problems" | "medication" | "allergies" | "results" |
                  "encounters" | "procedures" | "immunisations":
                  {"omitted": int,
                   "rows": [{"code_system", "code", "display", "status", "date",
                             "value", "unit", "statuses_differ": bool,
                             "earlier": int,
                             "sources": [{"node_id", "organisation",
                                          "organisation_id", "date", "status",
                                          "value", "unit", "display",
                                          "resource_id"}]}]}}}

``status``/``date``/``value`` of a row are its newest source's; ``earlier``
counts entries left out (see ``tools.report_merge``).

**FHIR** (``report_fhir``, ``--fhir``): a FHIR R4 ``Bundle`` of type
``collection`` holding, for every row, each source facility's own resource
(from ``resource_json``) exactly as the facility sent it, plus:

- ``meta.source`` on each resource = ``urn:transmural:node:<node id>``: the
  standard one-element answer to "which system did this come from";
- one ``Organization`` per contributing facility (name, organisation id)
  and one ``Provenance`` per facility whose ``target`` lists that
  facility's resources and whose ``agent.who`` is that Organization: the
  FHIR way to say who vouches for a resource, readable by any FHIR tool,
  where an extension would need our own definition.

Entries are addressed by ``urn:uuid`` full URLs derived from (node id,
resource id), because two facilities may hold copies under the same id.

What is *missing* is said too, so a saved bundle cannot pass for complete:
when the report may be incomplete or some facility asked did not answer
``ok``, the bundle's first entry is one ``OperationOutcome`` with one
``issue`` (severity ``warning``) per problem (``_outcome``):

- ``report.incomplete`` (registry unreachable, holders as last located):
  code ``incomplete``, ``diagnostics`` = that reason;
- each facility not ``ok``: code from ``ISSUE_CODES`` (``timeout``,
  ``unreachable`` -> ``transient``, ``consent-denied`` -> ``forbidden``,
  ``no-record`` -> ``not-found``, anything else -> ``exception``);
  ``details.coding`` = the facility's own status (system ``STATUS_SYSTEM``),
  ``details.text`` = ``<node id> (<organisation>, <organisation id>): <status>``,
  ``diagnostics`` = the facility's message (a stock phrase when it sent none).

``expression`` and ``location`` point into a resource, and a facility is
not one, hence ``details``.

The bundle never has an empty ``entry`` array (FHIR JSON allows none). A
patient no facility knows gets an ``OperationOutcome`` all the same, with an
``issue`` of severity ``information``, code ``not-found``, ``diagnostics``
"no facility in the network holds data on this patient" (after the
``incomplete`` warning when there is one); facilities that all answered
``ok`` with no usable resource, one of code ``informational``. Otherwise a
complete report (no ``incomplete``, every facility ``ok``) has no
``OperationOutcome``.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tools.render import printable
from tools.report_merge import Report, Row, Section, Source

SCHEMA_VERSION = 1
#: Width of the tables when stdout is not a terminal (rich would assume 80).
PLAIN_WIDTH = 140
SOURCE_URI = "urn:transmural:node:"
#: Numbers with this many decimals are shortened in tables (JSON and FHIR keep them whole).
_LONG_DECIMAL = re.compile(r"-?\d+\.\d{4,}")
_NAMESPACE = uuid.UUID("5d1c0c64-2a8e-4d0a-9a57-6f1d3e6f0b11")  # for stable full URLs
#: FHIR R4 issue-type (http://hl7.org/fhir/issue-type) for a facility that did not answer ok.
ISSUE_CODES = {
    "timeout": "timeout",
    "unreachable": "transient",
    "consent-denied": "forbidden",
    "no-record": "not-found",
    "error": "exception",
}
#: System of ``OperationOutcome.issue.details.coding``: a facility's status as ``--json`` has it.
STATUS_SYSTEM = "urn:transmural:facility-status"
#: ``diagnostics`` of a facility that sent no message.
_STOCK_DIAGNOSTICS = {
    "timeout": "no answer before the deadline",
    "unreachable": "the facility could not be reached",
    "consent-denied": "the patient's consent at this facility refused the request",
    "no-record": "the facility holds no record of this patient",
}
#: ``diagnostics`` of the one issue of a report on a patient no facility knows.
NO_FACILITY = "no facility in the network holds data on this patient"
#: ... and of a report whose facilities all answered ok with no usable resource.
NOTHING_STRUCTURED = "the facilities that answered sent no structured entries on this patient"

TITLES = {
    "problems": ("Problems", "condition"),
    "medication": ("Medication: active prescriptions", "medication"),
    "allergies": ("Allergies and intolerances", "substance"),
    "results": ("Results: latest per test", "test"),
    "encounters": ("Encounters", "encounter"),
    "procedures": ("Procedures", "procedure"),
    "immunisations": ("Immunisations", "vaccine"),
}
SYSTEMS = {
    "http://snomed.info/sct": "SNOMED",
    "http://loinc.org": "LOINC",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://www.ama-assn.org/go/cpt": "CPT",
}
STATUS_STYLES = {
    "ok": "green",
    "no-record": "dim",
    "consent-denied": "yellow",
    "timeout": "red",
    "unreachable": "red",
    "error": "red",
}


# --- tables ---


class _PipedConsole(Console):
    """rich exits 1 when the reader of a pipe leaves (``| head``); we let the
    caller end quietly with 0, as for every other output of ``transmural``."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def console_for(out: TextIO) -> Console:
    """A rich console on ``out``: colour on a terminal, fixed-width ASCII otherwise."""
    probe = _PipedConsole(file=out)
    if probe.is_terminal:
        return _PipedConsole(file=out, highlight=False)
    return _PipedConsole(file=out, highlight=False, width=PLAIN_WIDTH, color_system=None)


def print_tables(report: Report, out: TextIO) -> None:
    console = console_for(out)
    style = box.ROUNDED if console.is_terminal else box.ASCII
    console.print(facilities_table(report, style))
    for section in report.sections:
        console.print()
        if not section.rows:
            console.print(Text(f"{_title(section.name)}: none", style="dim"))
            continue
        console.print(section_table(section, style))


def facilities_table_text(report: Report) -> str:
    """The header table as plain text, for a caller printing to any stream."""
    console = Console(width=100, color_system=None, force_terminal=False)
    with console.capture() as captured:
        console.print(facilities_table(report))
    return captured.get().rstrip()


def facilities_table(report: Report, style: box.Box = box.ASCII) -> Table:
    title = _text(f"Live report for {report.patient}" if report.patient else "Live report")
    table = Table(title=title, box=style, title_justify="left")
    for name, justify in (("status", "left"), ("facility", "left"), ("organisation", "left"),
                          ("ms", "right"), ("entries / reason", "left")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    if not report.facilities:
        table.add_row("", "", "no facility in the network knows this patient", "", "")
    for f in report.facilities:
        detail = str(f.items) if f.status == "ok" else f.message
        if f.status == "ok" and f.message:  # e.g. answered from remembered holders
            detail = f"{detail} ({f.message})"
        table.add_row(
            _text(f.status, STATUS_STYLES.get(f.status, "")),
            _text(f.node_id), _text(f.organisation), str(f.elapsed_ms), _text(detail),
        )  # fmt: skip
    if report.correlation_id:
        table.caption = _text(f"correlation id {report.correlation_id}")
    return table


def section_table(section: Section, style: box.Box = box.ASCII) -> Table:
    title, noun = TITLES.get(section.name, (section.name.capitalize(), "entry"))
    results = section.name == "results"
    table = Table(title=f"{title} ({len(section.rows)})", box=style, title_justify="left")
    table.add_column(noun)
    table.add_column("code", style="dim")
    table.add_column("value" if results else "status")
    table.add_column("date")
    table.add_column(f"sources (facility, date, {'value' if results else 'status'})")
    for row in section.rows:
        table.add_row(
            _text(row.display or "(no text)"), _text(_code(row)), _state(row, results),
            _text(row.date[:10] or "no date"), _text(_sources(row, results)),
        )  # fmt: skip
    if section.omitted:
        table.caption = f"... and {section.omitted} older (--all shows every row)"
    return table


def _title(name: str) -> str:
    return TITLES.get(name, (name.capitalize(), ""))[0]


def _code(row: Row) -> str:
    system = SYSTEMS.get(row.code_system, row.code_system)
    return f"{system} {row.code}".strip()


def _state(row: Row, results: bool) -> Text:
    if results:
        return _text(_measure(row.value, row.unit))
    if row.statuses_differ:
        return _text(f"{row.status or '?'} (facilities differ)", "yellow")
    return _text(row.status)


def _text(text: str, style: str = "") -> Text:
    """A cell as sent: never read as rich markup (a name holding ``[/x]`` would
    raise), control characters escaped line by line (``tools.render.printable``)."""
    return Text("\n".join(printable(line) for line in text.split("\n")), style=style)


def _sources(row: Row, results: bool) -> str:
    # A result's value is in its own column; a source repeats it only when sources differ.
    values = results and len({(s.value, s.unit) for s in row.sources}) > 1
    lines = [_source_line(s, results, values) for s in row.sources]
    if row.earlier:
        lines.append(f"+{row.earlier} earlier")
    return "\n".join(lines)


def _source_line(s: Source, results: bool, values: bool) -> str:
    state = _measure(s.value, s.unit) if values else "" if results else s.status
    return "  ".join(p for p in (s.node_id, s.date[:10] or "no date", state) if p)


def _measure(value: str, unit: str) -> str:
    """Value and unit for the eye: machine-precision numbers (Synthea's) shortened."""
    return f"{_LONG_DECIMAL.sub(lambda m: _shorter(m.group()), value)} {unit}".strip()


def _shorter(number: str) -> str:
    x = float(number)
    if abs(x) < 1:
        return f"{x:.3g}"
    return f"{x:.{max(1, 4 - len(str(int(abs(x)))))}f}"


# --- JSON ---


def report_json(report: Report) -> dict[str, Any]:
    """The documented, stable JSON shape (module docstring)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "patient": report.patient,
        "correlation_id": report.correlation_id,
        "incomplete": report.incomplete,
        "facilities": [
            {
                "node_id": f.node_id,
                "organisation": f.organisation,
                "organisation_id": f.organisation_id,
                "status": f.status,
                "message": f.message,
                "elapsed_ms": f.elapsed_ms,
                "items": f.items,
            }
            for f in report.facilities
        ],
        "sections": {
            s.name: {"omitted": s.omitted, "rows": [_row_json(r) for r in s.rows]}
            for s in report.sections
        },
    }


def _row_json(row: Row) -> dict[str, Any]:
    return {
        "code_system": row.code_system,
        "code": row.code,
        "display": row.display,
        "status": row.status,
        "date": row.date,
        "value": row.value,
        "unit": row.unit,
        "statuses_differ": row.statuses_differ,
        "earlier": row.earlier,
        "sources": [
            {
                "node_id": s.node_id,
                "organisation": s.organisation,
                "organisation_id": s.organisation_id,
                "date": s.date,
                "status": s.status,
                "value": s.value,
                "unit": s.unit,
                "display": s.display,
                "resource_id": s.resource_id,
            }
            for s in row.sources
        ],
    }


# --- FHIR ---


def report_fhir(report: Report, now: datetime | None = None) -> dict[str, Any]:
    """A FHIR R4 collection Bundle of the report's resources, each with its source."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    organisations: dict[str, dict[str, Any]] = {}
    targets: dict[str, list[str]] = {}
    entries: list[dict[str, Any]] = []
    for section in report.sections:
        for row in section.rows:
            for source in row.sources:
                resource = _resource(source)
                if resource is None:
                    continue
                url = _urn(source.node_id, source.resource_id or json.dumps(resource))
                entries.append({"fullUrl": url, "resource": resource})
                targets.setdefault(source.node_id, []).append(url)
                organisations.setdefault(source.node_id, _organisation(source))
    for node_id, organisation in organisations.items():
        org_url = _urn(node_id, "Organization")
        entries.append({"fullUrl": org_url, "resource": organisation})
        entries.append({"fullUrl": _urn(node_id, "Provenance"),
                        "resource": _provenance(node_id, organisation, org_url,
                                                targets[node_id], stamp)})  # fmt: skip
    outcome = _outcome(report, nothing_else=not entries)
    if outcome is not None:
        entries.insert(0, {"fullUrl": f"urn:uuid:{outcome['id']}", "resource": outcome})
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "collection",
        "timestamp": stamp,
        "entry": entries,
    }


def _outcome(report: Report, nothing_else: bool = False) -> dict[str, Any] | None:
    """What the bundle lacks, as an OperationOutcome (module docstring); None if nothing.

    ``nothing_else``: the bundle has no other entry, and FHIR JSON allows no
    empty ``entry`` array, so the outcome then always says why it is empty.
    """
    issues: list[dict[str, Any]] = []
    if report.incomplete:
        issues.append({"severity": "warning", "code": "incomplete",
                       "diagnostics": report.incomplete})  # fmt: skip
    for f in report.facilities:
        if f.status == "ok":
            continue
        named = ", ".join(n for n in (f.organisation, f.organisation_id) if n)
        issues.append({
            "severity": "warning",
            "code": ISSUE_CODES.get(f.status, "exception"),
            "details": {
                "coding": [{"system": STATUS_SYSTEM, "code": f.status or "unknown"}],
                "text": f"{f.node_id} ({named}): {f.status}" if named
                        else f"{f.node_id}: {f.status}",
            },
            "diagnostics": f.message or _STOCK_DIAGNOSTICS.get(f.status, "the facility failed"),
        })  # fmt: skip
    if not report.facilities:
        issues.append({"severity": "information", "code": "not-found",
                       "diagnostics": NO_FACILITY})  # fmt: skip
    elif nothing_else and not issues:
        issues.append({"severity": "information", "code": "informational",
                       "diagnostics": NOTHING_STRUCTURED})  # fmt: skip
    if not issues:
        return None
    return {"resourceType": "OperationOutcome", "id": str(uuid.uuid4()), "issue": issues}


def _resource(source: Source) -> dict[str, Any] | None:
    """The facility's resource with ``meta.source`` set; None if it sent none usable."""
    if not source.resource_json:
        return None
    try:
        resource = json.loads(source.resource_json)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return None
    meta = resource.get("meta")
    resource["meta"] = {
        **(meta if isinstance(meta, dict) else {}),
        "source": SOURCE_URI + source.node_id,
    }
    return resource


def _organisation(source: Source) -> dict[str, Any]:
    organisation: dict[str, Any] = {"resourceType": "Organization", "id": source.node_id}
    if source.organisation_id:
        organisation["identifier"] = [{"value": source.organisation_id}]
    organisation["name"] = source.organisation or source.node_id
    return organisation


def _provenance(
    node_id: str, organisation: dict[str, Any], org_url: str, targets: list[str], stamp: str
) -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "id": str(uuid.uuid5(_NAMESPACE, f"{node_id}|Provenance")),
        "target": [{"reference": url} for url in targets],
        "recorded": stamp,
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/"
                            "provenance-participant-type",
                            "code": "custodian",
                            "display": "Custodian",
                        }
                    ]
                },
                "who": {"reference": org_url, "display": organisation["name"]},
            }
        ],
    }


def _urn(node_id: str, name: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{node_id}|{name}')}"
