"""The report's three faces: stable JSON, a FHIR R4 Bundle checked by a FHIR library, tables.

FHIR validation uses ``fhir.resources`` (pydantic models generated from the
FHIR specification). Its 8.x releases ship R5 (default), R4B (4.3.0) and
STU3; the last release with R4 (4.0.1) models is 6.4.0, on pydantic 1. R4B
is a small release on top of R4 that left the resources a report holds
(Condition, MedicationRequest, AllergyIntolerance, Observation, Encounter,
Procedure, Immunization, Organization, Provenance, OperationOutcome, Bundle)
as they were, so
``fhir.resources.R4B`` checks R4 JSON for them: types, required elements,
cardinality, choice types, and no unknown elements (it refuses any). It
does not check terminology bindings or FHIRPath invariants; the test checks
the one invariant the bundle's construction could break (unique fullUrl).
"""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from tools.gateway_client import ClinicalItem, FacilityItems
from tools.report_merge import SECTIONS, Report, merge
from tools.report_view import (
    SOURCE_URI,
    STATUS_SYSTEM,
    console_for,
    print_tables,
    report_fhir,
    report_json,
)
from tools.synthetic import generate

SECTION_OF = {
    "Condition": "problems",
    "MedicationRequest": "medication",
    "AllergyIntolerance": "allergies",
    "Observation": "results",
    "Encounter": "encounters",
    "Procedure": "procedures",
    "Immunization": "immunisations",
}
PROCEDURE = {
    "resourceType": "Procedure",
    "id": "proc-1",
    "status": "completed",
    "code": {
        "coding": [
            {"system": "http://snomed.info/sct", "code": "80146002", "display": "Appendectomy"}
        ]
    },
    "subject": {"reference": "Patient/p1"},
    "performedDateTime": "2019-04-02T10:00:00+02:00",
}


def as_item(resource: dict[str, Any]) -> ClinicalItem:
    """What a node would send for one resource (the node side's job; enough for a test)."""
    kind = resource["resourceType"]
    concept = (
        resource.get("code")
        or resource.get("vaccineCode")
        or resource.get("medicationCodeableConcept")
        or resource.get("type", [{}])[0]
    )
    coding = concept["coding"][0]
    status = resource.get("clinicalStatus", {}).get("coding", [{}])[0].get("code") or resource.get(
        "status", ""
    )
    date = next(
        (resource[k] for k in ("onsetDateTime", "authoredOn", "effectiveDateTime",
                               "occurrenceDateTime", "performedDateTime", "recordedDate")
         if k in resource),
        resource.get("period", {}).get("start", ""),
    )  # fmt: skip
    quantity = resource.get("valueQuantity", {})
    return ClinicalItem(
        SECTION_OF[kind], coding["system"], coding["code"], coding.get("display", ""), status,
        date, str(quantity.get("value", "")), quantity.get("unit", ""), f"{kind}/{resource['id']}",
        json.dumps(resource).encode(),
    )  # fmt: skip


def synthetic_resources(folder: Path) -> list[dict[str, Any]]:
    generate(folder, patients=1)
    (bundle,) = folder.glob("*.json")
    resources = [e["resource"] for e in json.loads(bundle.read_text())["entry"]]
    for r in resources:
        if r["resourceType"] == "MedicationRequest":
            r["status"] = "active"  # the report shows active prescriptions only
    return [r for r in resources if r["resourceType"] in SECTION_OF] + [PROCEDURE]


@pytest.fixture
def report(tmp_path: Path) -> Report:
    """One patient's record at a GP, with the conditions also recorded at a hospital."""
    resources = synthetic_resources(tmp_path)
    conditions = [r for r in resources if r["resourceType"] == "Condition"]
    return merge(
        [
            FacilityItems("gp", "Huisartsenpraktijk De Linde", "ok", 40, "", "URA-1",
                          [as_item(r) for r in resources]),
            # Same resource ids at a second facility: copies, as a spread record has.
            FacilityItems("hospital", "Ziekenhuis Noord", "ok", 85, "", "URA-2",
                          [as_item(r) for r in conditions]),
            FacilityItems("pharmacy", "Apotheek", "consent-denied", 12, "consent refused"),
        ],
        patient="999911120",
        correlation_id="c-42",
    )  # fmt: skip


def test_fhir_bundle_is_valid_r4(report: Report) -> None:
    bundle = report_fhir(report)
    parsed = Bundle.model_validate_json(json.dumps(bundle))
    assert parsed.type == "collection"
    kinds = {e.resource.get_resource_type() for e in parsed.entry}
    assert set(SECTION_OF) | {"Organization", "Provenance"} <= kinds
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(urls) == len(set(urls)), "bdl-7: fullUrl unique"
    assert all(uuid.UUID(u.removeprefix("urn:uuid:")) for u in urls)


def test_every_resource_names_its_source_facility(report: Report) -> None:
    bundle = report_fhir(report)
    clinical = [e for e in bundle["entry"] if e["resource"]["resourceType"] in SECTION_OF]
    sources = {e["resource"]["meta"]["source"] for e in clinical}
    assert sources == {SOURCE_URI + "gp", SOURCE_URI + "hospital"}
    organisations = {
        e["fullUrl"]: e["resource"]["name"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Organization"
    }
    vouched: dict[str, str] = {}
    for e in bundle["entry"]:
        if e["resource"]["resourceType"] == "Provenance":
            who = organisations[e["resource"]["agent"][0]["who"]["reference"]]
            vouched.update({t["reference"]: who for t in e["resource"]["target"]})
    assert {e["fullUrl"] for e in clinical} == set(vouched)
    hospital = [e for e in clinical if e["resource"]["meta"]["source"].endswith("hospital")]
    assert hospital and all(vouched[e["fullUrl"]] == "Ziekenhuis Noord" for e in hospital)


def test_the_validator_refuses_what_r4_refuses(report: Report) -> None:
    """A control: the library really checks entries, so a pass above means something."""
    bundle = report_fhir(report)
    condition = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Condition")
    del condition["resource"]["subject"]  # 1..1 in R4
    with pytest.raises(ValidationError, match="subject"):
        Bundle.model_validate(bundle)


def outcomes(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "OperationOutcome"
    ]


def test_a_complete_report_has_no_operation_outcome() -> None:
    """Every facility answered ok and the registry too: the bundle stays as it was."""
    complete = merge(
        [FacilityItems("gp", "Huisartsenpraktijk De Linde", "ok", 40, "", "URA-1",
                       [as_item(PROCEDURE)])],
        patient="999911120",
    )  # fmt: skip
    bundle = report_fhir(complete)
    Bundle.model_validate_json(json.dumps(bundle))
    assert outcomes(bundle) == []
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == [
        "Procedure", "Organization", "Provenance",
    ]  # fmt: skip


def test_a_saved_bundle_says_what_it_may_lack() -> None:
    """Registry down (remembered holders) and one facility unreachable: both are in the file,
    not only on stderr, so whoever reads the saved bundle later knows it may be incomplete."""
    reason = "registry unreachable: results may be incomplete"
    report = merge(
        [
            FacilityItems("gp", "Huisartsenpraktijk De Linde", "ok", 40, reason, "URA-1",
                          [as_item(PROCEDURE)]),
            FacilityItems("hospital", "Ziekenhuis Noord", "unreachable", 3000,
                          "connection refused", "URA-2"),
        ],
        patient="999911120",
        incomplete=reason,
    )  # fmt: skip
    bundle = report_fhir(report)
    parsed = Bundle.model_validate_json(json.dumps(bundle))
    assert parsed.entry[0].resource.get_resource_type() == "OperationOutcome", "read first"
    (outcome,) = outcomes(bundle)
    assert bundle["entry"][0]["fullUrl"] == f"urn:uuid:{outcome['id']}"
    registry, hospital = outcome["issue"]
    assert registry == {"severity": "warning", "code": "incomplete", "diagnostics": reason}
    assert hospital == {
        "severity": "warning",
        "code": "transient",
        "details": {
            "coding": [{"system": STATUS_SYSTEM, "code": "unreachable"}],
            "text": "hospital (Ziekenhuis Noord, URA-2): unreachable",
        },
        "diagnostics": "connection refused",
    }
    # The facility that answered is vouched for as before; the one that did not is named only
    # in the outcome (no Organization: it contributed nothing).
    names = [e["resource"]["name"] for e in bundle["entry"]
             if e["resource"]["resourceType"] == "Organization"]  # fmt: skip
    assert names == ["Huisartsenpraktijk De Linde"]


@pytest.mark.parametrize(
    ("status", "message", "code"),
    [
        ("timeout", "", "timeout"),
        ("consent-denied", "", "forbidden"),
        ("no-record", "", "not-found"),
        ("error", "internal error", "exception"),
        ("something-new", "", "exception"),
    ],
)
def test_each_facility_status_is_an_r4_issue_type(status: str, message: str, code: str) -> None:
    report = merge([FacilityItems("node-3", "", status, 5, message)])
    bundle = report_fhir(report)
    Bundle.model_validate_json(json.dumps(bundle))
    ((issue,),) = [o["issue"] for o in outcomes(bundle)]
    assert issue["code"] == code and issue["details"]["coding"][0]["code"] == status
    assert issue["details"]["text"] == f"node-3: {status}"
    assert issue["diagnostics"] == message or (not message and issue["diagnostics"].strip())


def test_json_schema_keys_are_stable(report: Report) -> None:
    answer = json.loads(json.dumps(report_json(report)))
    assert set(answer) == {
        "schema_version", "patient", "correlation_id", "incomplete", "facilities", "sections",
    }  # fmt: skip
    assert answer["schema_version"] == 1 and answer["correlation_id"] == "c-42"
    assert answer["incomplete"] == ""  # the registry answered
    remembered = dataclasses.replace(report, incomplete="registry unreachable: ...")
    assert report_json(remembered)["incomplete"] == "registry unreachable: ..."
    assert set(answer["facilities"][0]) == {
        "node_id", "organisation", "organisation_id", "status", "message", "elapsed_ms", "items",
    }  # fmt: skip
    assert list(answer["sections"]) == list(SECTIONS)
    row = answer["sections"]["problems"]["rows"][0]
    assert set(answer["sections"]["problems"]) == {"rows", "omitted"}
    assert set(row) == {
        "code_system", "code", "display", "status", "date", "value", "unit",
        "statuses_differ", "earlier", "sources",
    }  # fmt: skip
    assert set(row["sources"][0]) == {
        "node_id", "organisation", "organisation_id", "date", "status", "value", "unit",
        "display", "resource_id",
    }  # fmt: skip
    assert {s["node_id"] for s in row["sources"]} == {"gp", "hospital"}


def test_tables_without_a_terminal_are_plain_ascii(report: Report) -> None:
    out = io.StringIO()
    print_tables(report, out)
    text = out.getvalue()
    assert text.isascii() or "…" in text  # rich may shorten a long cell with an ellipsis
    assert "\x1b[" not in text, "no colour codes into a pipe"
    for expected in ("consent-denied", "consent refused", "Ziekenhuis Noord", "Problems",
                     "Appendectomy", "c-42"):  # fmt: skip
        assert expected in text
    assert "gp  " in text and "hospital  " in text  # a row lists both sources


def test_tables_for_no_facility_say_so() -> None:
    out = io.StringIO()
    print_tables(merge([]), out)
    assert "no facility in the network knows this patient" in out.getvalue()
    assert "Problems: none" in out.getvalue()


def test_a_reader_leaving_the_pipe_is_not_an_error() -> None:
    """rich would exit 1 on a broken pipe (`| head`); transmural ends quietly with 0."""
    console = console_for(io.StringIO())
    with pytest.raises(BrokenPipeError):
        console.on_broken_pipe()


def empty_arrays(value: Any, path: str = "") -> list[str]:
    """Where ``value`` holds ``[]``: FHIR JSON forbids empty arrays (leave the key out),
    a rule the validator above does not check."""
    if isinstance(value, list):
        found = [path] if not value else []
        return found + [p for i, v in enumerate(value) for p in empty_arrays(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in empty_arrays(v, f"{path}.{k}")]
    return []


@pytest.mark.parametrize("incomplete", ["", "registry unreachable: results may be incomplete"])
def test_a_patient_no_facility_knows_is_said_in_the_bundle(incomplete: str) -> None:
    """`report UNKNOWN --fhir`: not `"entry": []` (invalid FHIR, and silent), but one
    OperationOutcome saying no facility holds data (and why that may not be certain)."""
    bundle = report_fhir(merge([], patient="999940375", incomplete=incomplete))
    assert empty_arrays(bundle) == []
    parsed = Bundle.model_validate_json(json.dumps(bundle))
    assert [e.resource.get_resource_type() for e in parsed.entry] == ["OperationOutcome"]
    (outcome,) = outcomes(bundle)
    not_found = {
        "severity": "information",
        "code": "not-found",
        "diagnostics": "no facility in the network holds data on this patient",
    }
    if incomplete:
        assert outcome["issue"] == [
            {"severity": "warning", "code": "incomplete", "diagnostics": incomplete}, not_found,
        ]  # fmt: skip
    else:
        assert outcome["issue"] == [not_found]


def test_facilities_with_nothing_structured_still_make_a_bundle_with_entries() -> None:
    """Every facility answered ok, none with a usable resource: still no empty array."""
    bundle = report_fhir(merge([FacilityItems("gp", "Huisartsenpraktijk", "ok", 40)]))
    assert empty_arrays(bundle) == []
    Bundle.model_validate_json(json.dumps(bundle))
    ((issue,),) = [o["issue"] for o in outcomes(bundle)]
    assert issue["severity"] == "information" and "no structured" in issue["diagnostics"]


def test_tables_show_what_facilities_sent_as_text_not_markup_nor_terminal_codes() -> None:
    """A name, message or display from the network (or an identifier the clinician typed)
    holding rich markup or an escape: shown as text, never parsed (``[/x]`` would raise)
    nor sent raw to the terminal."""
    odd = "Org [/x] [bold]b[/bold] \x1b[31mred"
    procedure = {**PROCEDURE, "code": {"coding": [
        {"system": "http://snomed.info/sct", "code": "80146002", "display": odd}]}}  # fmt: skip
    report = merge(
        [FacilityItems("gp", odd, "ok", 40, "", "URA-1", [as_item(procedure)]),
         FacilityItems("n2", odd, "timeout", 5, f"waited [/oops] {odd}")],
        patient="urn:x|[/y]\x1b[2J",
    )  # fmt: skip
    out = io.StringIO()
    print_tables(report, out)
    text = out.getvalue()
    assert "\x1b" not in text
    assert "[/oops]" in text and "[/y]" in text and "\\x1b[31mred" in text


def test_long_node_ids_keep_the_columns_in_line() -> None:
    from tools.gateway_client import Document, FacilityResult
    from tools.render import documents_table, facility_line, node_width

    ids = ["node-1", "ura-12345678901"]
    width = node_width(ids)
    lines = [facility_line(FacilityResult(node_id, "Facility", "ok", 5), width) for node_id in ids]
    assert lines[0].index("Facility") == lines[1].index("Facility")
    document = Document(
        "DocumentReference/1", "Note", "", "", "text/plain", 10, "", "2025-01-01", ""
    )
    table = documents_table([FacilityResult(n, "F", "ok", 5, documents=[document]) for n in ids])
    assert len({line.index("2025") for line in table[1:]}) == 1
    assert node_width(["x" * 64]) == 24  # a 64-character id is cut, not the whole table
