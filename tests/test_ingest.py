"""Ingest of FHIR R4 bundles: the real Synthea sets, and every way a file can be wrong.

The Synthea sets live beside the checkout in ``../shared/data`` (see each
folder's README for the counts checked here). Each set is ingested once per
module; a missing data folder fails these tests rather than skipping them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from node import ingest as ingest_module
from node.fhir import compact_json
from node.ingest import bundle_files, ingest_file, ingest_folder
from node.records import IngestReport
from node.store import NodeStore
from transmural.errors import InvalidBundle
from transmural.identifiers import BSN_SYSTEM, US_SSN_SYSTEM, canonical
from transmural.pseudonym import Pseudonymiser

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMART = DATA / "synthea-smart-r4" / "bundles"
HIV = DATA / "synthea-hiv-r4" / "bundles"
PSEUDONYMS = Pseudonymiser(b"ingest-test-network-key-32-bytes!!")
SYNTHEA = "https://github.com/synthetichealth/synthea"


def data_folder(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.fail(
            f"test data missing: {folder} does not exist. The Synthea bundles are expected in "
            "../shared/data beside the repository checkout (see DESIGN.md, 'Real input')."
        )
    return folder


@dataclass
class Ingested:
    database: Path
    reports: list[IngestReport]
    errors: list[InvalidBundle]
    seconds: float


def ingest_once(folder: Path, database: Path) -> Ingested:
    async def run() -> Ingested:
        store = await NodeStore.open(database)
        try:
            started = time.perf_counter()
            reports, errors = await ingest_folder(store, folder, PSEUDONYMS, US_SSN_SYSTEM)
            return Ingested(database, reports, errors, time.perf_counter() - started)
        finally:
            await store.close()

    ingested = asyncio.run(run())
    print(f"\nfull ingest of {folder.parent.name}: {ingested.seconds:.2f} s")
    return ingested


@pytest.fixture(scope="module")
def smart(tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    return ingest_once(data_folder(SMART), tmp_path_factory.mktemp("smart") / "node.db")


@pytest.fixture(scope="module")
def hiv(tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    return ingest_once(data_folder(HIV), tmp_path_factory.mktemp("hiv") / "node.db")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[NodeStore]:
    opened = await NodeStore.open(tmp_path / "node.db")
    yield opened
    await opened.close()


def counts_by_type(database: Path) -> dict[str, int]:
    with sqlite3.connect(database) as db:
        return dict(db.execute("SELECT resource_type, COUNT(*) FROM resources GROUP BY 1"))


# --- the SMART set: 90 patients, transaction bundles, urn:uuid references ---


def test_smart_set_ingests_without_errors(smart: Ingested) -> None:
    assert [str(error) for error in smart.errors] == []
    assert len(smart.reports) == 92
    assert sum(r.patients for r in smart.reports) == 90
    assert sum(r.unpublished for r in smart.reports) == 0


def test_smart_set_counts_match_its_readme(smart: Ingested) -> None:
    counts = counts_by_type(smart.database)
    readme = {
        "Observation": 12_816,
        "Claim": 3_408,
        "Encounter": 2_708,
        "ExplanationOfBenefit": 2_708,
        "Procedure": 1_808,
        "Immunization": 1_109,
        "DiagnosticReport": 893,
        "MedicationRequest": 700,
        "Condition": 636,
        "CarePlan": 226,
        "Goal": 168,
        "Patient": 90,
        "ImagingStudy": 62,
        "AllergyIntolerance": 35,
    }
    assert {kind: counts[kind] for kind in readme} == readme
    # Patient bundles repeat the provider bundles' organisations and practitioners
    # under the same ids (257 entries each): upsert keeps one of each.
    assert counts["Organization"] == counts["Practitioner"] == 102


async def test_smart_patients_have_pseudonyms_of_their_ssn(smart: Ingested) -> None:
    store = await NodeStore.open(smart.database)
    try:
        patients = await store.patients()
        assert len(patients) == 90
        for record in patients:
            assert record.identifier is not None and record.identifier.system == US_SSN_SYSTEM
            assert record.pseudonym == PSEUDONYMS.pseudonym(record.identifier)
            assert not record.exchange_consent
        assert len({p.pseudonym for p in patients}) == 90
        assert {"Montañez", "Treviño", "Alcántar"} <= {p.family for p in patients}
        changes = await store.pending_index_changes(1000)
        assert len(changes) == 90 and not any(c.withdrawn for c in changes)
        assert {c.pseudonym for c in changes} == {p.pseudonym for p in patients}
    finally:
        await store.close()


def test_smart_references_are_rewritten_like_a_fhir_server_would(smart: Ingested) -> None:
    with sqlite3.connect(smart.database) as db:
        left = db.execute(
            'SELECT COUNT(*) FROM resources WHERE json LIKE \'%"reference":"urn:uuid:%\''
        ).fetchone()[0]
        claim = json.loads(
            db.execute(
                "SELECT json FROM resources WHERE resource_type = 'ExplanationOfBenefit' LIMIT 1"
            ).fetchone()[0]
        )
    assert left == 0
    assert claim["referral"]["reference"] == "#referral"  # contained: left alone
    assert claim["patient"]["reference"].startswith("Patient/")


async def test_smart_encounters_become_summary_documents(smart: Ingested) -> None:
    store = await NodeStore.open(smart.database)
    try:
        assert await store.document_count() == 2_708  # no DocumentReference in this set
        patient = (await store.patients())[0]
        documents = await store.documents_of(patient.patient_key)
        assert [d.created for d in documents] == sorted(
            (d.created for d in documents), reverse=True
        )
        summary = documents[0]
        assert summary.type_code == "34133-9" and summary.content_type == "application/fhir+json"
        assert summary.title.startswith("Encounter summary: ")
        assert summary.author_organisation  # resolved serviceProvider name
        content = b"".join([chunk async for chunk in store.document_chunks(summary.document_id)])
        assert len(content) == summary.size
        collection = json.loads(content)
        assert collection["type"] == "collection"
        # Built from each resource's stored JSON, it reads as json.dumps would write it.
        assert content == compact_json(collection).encode()
        encounter = collection["entry"][0]["resource"]
        assert encounter["resourceType"] == "Encounter"
        assert summary.document_id == f"Encounter/{encounter['id']}/summary"
        kinds = {e["resource"]["resourceType"] for e in collection["entry"]}
        assert "Claim" in kinds
    finally:
        await store.close()


# --- the HIV set: batch provider bundles, conditional references, DocumentReference ---


def test_hiv_set_ingests_without_errors(hiv: Ingested) -> None:
    assert [str(error) for error in hiv.errors] == []
    assert [r.file for r in hiv.reports[:2]] == [
        "hospitalInformation1633536936158.json",
        "practitionerInformation1633536936158.json",
    ]
    assert sum(r.patients for r in hiv.reports) == 17
    counts = counts_by_type(hiv.database)
    assert counts["DocumentReference"] == counts["Encounter"] == 880
    assert counts["Organization"] == counts["Location"] == counts["PractitionerRole"] == 1_191


async def test_hiv_document_references_are_text_documents(hiv: Ingested) -> None:
    store = await NodeStore.open(hiv.database)
    try:
        patients = await store.patients()
        assert len(patients) == 17 and all(p.pseudonym is not None for p in patients)
        notes = 0
        for patient in patients:
            for document in await store.documents_of(patient.patient_key):
                assert document.document_id.startswith("DocumentReference/")
                assert document.content_type == "text/plain; charset=utf-8"
                assert document.type_system == "http://loinc.org" and document.type_code
                content = b"".join([c async for c in store.document_chunks(document.document_id)])
                text = content.decode("utf-8")
                assert 300 <= len(text) <= 700 and len(content) == document.size
                assert document.author_organisation
                notes += 1
        # One note per encounter: no encounter summaries, and the DiagnosticReport
        # copy of each note is not offered a second time.
        assert notes == 880 == await store.document_count()
    finally:
        await store.close()


async def test_patient_bundle_before_its_providers_still_names_the_organisation(
    store: NodeStore, tmp_path: Path
) -> None:
    source = data_folder(HIV) / "Samuel331_Terry864_1e610c5a-ff61-c754-2538-d059748636fc.json"
    bundle = json.loads(source.read_text(encoding="utf-8"))
    for entry in bundle["entry"]:  # without displays, only the provider bundle can name it
        for field in ("serviceProvider", "custodian"):
            entry["resource"].get(field, {}).pop("display", None)
    patient_file = tmp_path / source.name
    patient_file.write_text(json.dumps(bundle), encoding="utf-8")
    encounter = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter"
    )
    provider = encounter["serviceProvider"]["reference"]
    assert provider.startswith(f"Organization?identifier={SYNTHEA}|")

    await ingest_file(store, patient_file, PSEUDONYMS, US_SSN_SYSTEM)
    (patient,) = await store.patients()
    assert await store.resolve(provider) is None
    assert {d.author_organisation for d in await store.documents_of(patient.patient_key)} == {""}

    for name in (
        "hospitalInformation1633536936158.json",
        "practitionerInformation1633536936158.json",
    ):
        await ingest_file(store, HIV / name, PSEUDONYMS, US_SSN_SYSTEM)
    organisation = await store.resolve(provider)
    assert organisation is not None and organisation["name"] == "PCP13375"
    names = {d.author_organisation for d in await store.documents_of(patient.patient_key)}
    assert "PCP13375" in names and "" not in names


# --- re-ingest and rejection ---


async def test_reingest_adds_nothing(store: NodeStore) -> None:
    path = data_folder(HIV) / "Samuel331_Terry864_1e610c5a-ff61-c754-2538-d059748636fc.json"
    first = await ingest_file(store, path, PSEUDONYMS, US_SSN_SYSTEM)
    counts = await _counts(store)
    second = await ingest_file(store, path, PSEUDONYMS, US_SSN_SYSTEM)
    assert await _counts(store) == counts
    assert (first.published, second.published) == (1, 0)
    assert first.resources == second.resources == counts[0]


def bundle_of(*resources: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "POST", "url": r["resourceType"]},
            }
            for r in resources
        ],
    }


def dutch_patient(fhir_id: str, bsn: str, system: str = BSN_SYSTEM) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": fhir_id,
        "identifier": [{"system": system, "value": bsn}],
        "name": [{"use": "official", "family": "Jansen", "given": ["Anna", "Maria"]}],
        "birthDate": "1980-02-29",
    }


def note(fhir_id: str, patient: str, data: str = "aGVsbG8=") -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": fhir_id,
        "subject": {"reference": f"urn:uuid:{patient}"},
        "type": {
            "coding": [{"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}]
        },
        "date": "2024-01-02T03:04:05.678+01:00",
        "custodian": {"reference": "Organization?identifier=urn:oid:2.16.528.1.1007.3.3|00000001"},
        "content": [{"attachment": {"contentType": "text/plain", "data": data}}],
    }


MALFORMED: dict[str, tuple[str | bytes, str]] = {
    "not-json.json": ('{"resourceType": "Bundle", ', "not JSON"),
    "not-utf8.json": (b"\xff\xfe{}", "not JSON"),
    "array.json": ("[]", "not a JSON object"),
    "no-bundle.json": ('{"resourceType": "Patient", "id": "x"}', 'not "Bundle"'),
    "searchset.json": (json.dumps({**bundle_of(), "type": "searchset"}), "not one we ingest"),
    "no-entry.json": ('{"resourceType": "Bundle", "type": "transaction"}', 'no "entry" list'),
    "entry-not-list.json": (
        '{"resourceType": "Bundle", "type": "transaction", "entry": {}}',
        'no "entry" list',
    ),
    "no-id.json": (
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {"resource": dutch_patient("p9", "111222333")},
                    {"resource": {"resourceType": "Observation", "status": "final"}},
                ],
            }
        ),
        'entry 1 (Observation): no "id"',
    ),
    "no-resource.json": (
        '{"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET"}}]}',
        'entry 0: no "resource"',
    ),
    "bad-bsn.json": (
        json.dumps(bundle_of(dutch_patient("p9", "123456789"))),
        "fails the 11-check",
    ),
    "twice.json": (
        json.dumps(bundle_of(dutch_patient("p9", "111222333"), dutch_patient("p9", "111222333"))),
        "is also entry 0",
    ),
    "delete.json": (
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {"resource": dutch_patient("p9", "111222333"), "request": {"method": "DELETE"}}
                ],
            }
        ),
        "not supported",
    ),
    "bad-base64.json": (
        json.dumps(bundle_of(dutch_patient("p9", "111222333"), note("n9", "p9", "not base64!"))),
        "not base64",
    ),
    # Shapes FHIR does not allow, which Python would otherwise trip over.
    "type-is-list.json": (
        '{"resourceType": "Bundle", "type": [], "entry": []}',
        "not one we ingest",
    ),
    "long-integer.json": (
        '{"resourceType": "Bundle", "type": "batch", "n": ' + "9" * 5000 + ', "entry": []}',
        "not JSON we accept: an integer of 5000 digits (at most 100)",
    ),
    "bsn-as-number.json": (
        json.dumps(
            bundle_of(
                {
                    "resourceType": "Patient",
                    "id": "p1",
                    "identifier": [{"system": BSN_SYSTEM, "value": 123456782}],
                }
            )
        ),
        'entry 0 (Patient): an identifier\'s "value" is not a JSON string',
    ),
    "identifier-not-a-list.json": (
        json.dumps(bundle_of({"resourceType": "Patient", "id": "p1", "identifier": "oops"})),
        'entry 0 (Patient): "identifier" is not a list',
    ),
    "utf-16.json": (
        '{"resourceType": "Bundle", "type": "batch", "entry": []}'.encode("utf-16"),
        "not JSON: not UTF-8 text",
    ),
    "infinity.json": (
        '{"resourceType": "Bundle", "type": "batch", "n": 1e999, "entry": []}',
        "not JSON we accept: the number 1e999 is too large",
    ),
    "nan.json": (
        '{"resourceType": "Bundle", "type": "batch", "n": NaN, "entry": []}',
        "NaN is not a JSON number",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_malformed_bundle_is_rejected_and_nothing_changes(
    store: NodeStore, tmp_path: Path, name: str
) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(bundle_of(dutch_patient("p1", "111222333"), note("n1", "p1"))))
    await ingest_file(store, good, PSEUDONYMS, BSN_SYSTEM)
    before = await _counts(store)
    content, problem = MALFORMED[name]
    bad = tmp_path / name
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidBundle) as raised:
        await ingest_file(store, bad, PSEUDONYMS, BSN_SYSTEM)
    message = str(raised.value)
    assert message.startswith(f"{name}: ") and problem in message
    assert "123456789" not in message  # the identifier itself is not repeated
    assert await _counts(store) == before


def test_a_shape_no_check_foresaw_is_refused_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's own TypeError and the like, deep in conversion, end one file, not the run."""

    def trips(*args: Any) -> Any:
        raise AttributeError("'str' object has no attribute 'get'")

    monkeypatch.setattr(ingest_module, "build_documents", trips)
    bundle = tmp_path / "odd.json"
    bundle.write_text(json.dumps(bundle_of(dutch_patient("p1", "111222333"))))
    with pytest.raises(InvalidBundle, match=r"^odd.json: not FHIR this node can read"):
        ingest_module.prepare_bundle(bundle, BSN_SYSTEM, PSEUDONYMS)


def test_a_period_given_as_text_is_no_reason_to_crash(tmp_path: Path) -> None:
    bundle = tmp_path / "period.json"
    odd_note = {**note("n1", "p1"), "context": {"period": "2020"}}
    bundle.write_text(json.dumps(bundle_of(dutch_patient("p1", "111222333"), odd_note)))
    draft = ingest_module.prepare_bundle(bundle, BSN_SYSTEM, PSEUDONYMS)
    assert [d.document_id for d in draft.documents] == ["DocumentReference/n1"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
async def test_a_fifo_or_device_among_the_bundles_is_refused_not_read(
    store: NodeStore, tmp_path: Path
) -> None:
    (tmp_path / "a-good.json").write_text(json.dumps(bundle_of(dutch_patient("p1", "111222333"))))
    os.mkfifo(tmp_path / "b-fifo.json")  # reading it would wait for a writer for ever
    (tmp_path / "c-zero.json").symlink_to("/dev/zero")  # reading it would never end
    reports, errors = await asyncio.wait_for(
        ingest_folder(store, tmp_path, PSEUDONYMS, BSN_SYSTEM), timeout=30
    )
    assert [r.file for r in reports] == ["a-good.json"]
    assert sorted(str(e) for e in errors) == [
        "b-fifo.json: not a regular file",
        "c-zero.json: not a regular file",
    ]


async def test_folder_ingest_reports_each_bad_file_and_loads_the_rest(
    store: NodeStore, tmp_path: Path
) -> None:
    (tmp_path / "a-good.json").write_text(json.dumps(bundle_of(dutch_patient("p1", "111222333"))))
    (tmp_path / "b-bad.json").write_text("[]")
    (tmp_path / "c-good.json").write_text(json.dumps(bundle_of(dutch_patient("p2", "012345672"))))
    (tmp_path / "notes.txt").write_text("not a bundle, not looked at")
    reports, errors = await ingest_folder(store, tmp_path, PSEUDONYMS, BSN_SYSTEM)
    assert [r.file for r in reports] == ["a-good.json", "c-good.json"]
    assert [str(e) for e in errors] == ["b-bad.json: not a JSON object (a FHIR Bundle is one)"]
    assert "1 patients" in reports[0].summary()
    assert len(await store.patients()) == 2


async def test_dutch_identifiers_are_canonicalised_before_pseudonymising(
    store: NodeStore, tmp_path: Path
) -> None:
    path = tmp_path / "nl.json"
    oid = "urn:oid:2.16.840.1.113883.2.4.6.3"
    wrapped = (
        base64.b64encode(b"hello").decode()[:4] + "\n" + base64.b64encode(b"hello").decode()[4:]
    )
    path.write_text(
        json.dumps(bundle_of(dutch_patient("p1", "1234.56.782", oid), note("n1", "p1", wrapped)))
    )
    report = await ingest_file(store, path, PSEUDONYMS, "bsn")
    assert (report.patients, report.published, report.documents) == (1, 1, 1)
    (patient,) = await store.patients()
    assert patient.identifier == canonical(BSN_SYSTEM, "123456782")
    assert patient.pseudonym == PSEUDONYMS.pseudonym(canonical(BSN_SYSTEM, "123456782"))
    assert (patient.family, patient.given, patient.birth_date) == (
        "Jansen",
        "Anna Maria",
        "1980-02-29",
    )
    (document,) = await store.documents_of(patient.patient_key)
    assert document.document_id == "DocumentReference/n1"
    assert document.created == "2024-01-02T02:04:05+00:00"  # UTC, to the second
    assert b"".join([c async for c in store.document_chunks("DocumentReference/n1")]) == b"hello"


async def test_patient_without_national_identifier_is_stored_but_not_published(
    store: NodeStore, tmp_path: Path
) -> None:
    path = tmp_path / "anon.json"
    path.write_text(json.dumps(bundle_of(dutch_patient("p1", "x-1", "http://example.org/mrn"))))
    report = await ingest_file(store, path, PSEUDONYMS, BSN_SYSTEM)
    assert (report.patients, report.unpublished, report.published) == (1, 1, 0)
    assert await store.pending_index_count() == 0
    (patient,) = await store.patients()
    assert patient.identifier is None and patient.pseudonym is None


async def test_a_bundle_without_the_bsn_keeps_the_patient_findable(
    store: NodeStore, tmp_path: Path
) -> None:
    """An export that leaves the BSN out must not take the patient out of the index."""
    with_bsn, without = tmp_path / "with.json", tmp_path / "without.json"
    with_bsn.write_text(json.dumps(bundle_of(dutch_patient("p1", "123456782"), note("n1", "p1"))))
    without.write_text(
        json.dumps(bundle_of({"resourceType": "Patient", "id": "p1"}, note("n2", "p1")))
    )
    await ingest_file(store, with_bsn, PSEUDONYMS, BSN_SYSTEM)
    pending = await store.pending_index_count()
    report = await ingest_file(store, without, PSEUDONYMS, BSN_SYSTEM)
    assert (report.kept_identifiers, report.unpublished, report.new_patients) == (1, 0, 0)
    (patient,) = await store.patients()
    bsn = canonical(BSN_SYSTEM, "123456782")
    assert patient.identifier == bsn and patient.pseudonym == PSEUDONYMS.pseudonym(bsn)
    assert await store.pending_index_count() == pending  # no withdrawal queued
    assert len(await store.documents_of(patient.patient_key)) == 2
    found = await store.patient_by_identifier(bsn)
    assert found is not None and found.patient_key == patient.patient_key


async def test_no_patient_name_or_identifier_is_logged_above_debug(
    store: NodeStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(
        data_folder(HIV) / "Samuel331_Terry864_1e610c5a-ff61-c754-2538-d059748636fc.json", folder
    )
    bad_ssn = dutch_patient("p9", "1234567890", US_SSN_SYSTEM)
    (folder / "Jansen_bad.json").write_text(json.dumps(bundle_of(bad_ssn)))
    with caplog.at_level(logging.INFO):
        reports, errors = await ingest_folder(store, folder, PSEUDONYMS, US_SSN_SYSTEM)
    assert (len(reports), len(errors)) == (1, 1)
    for secret in ("Samuel331", "Terry864", "999-60-8510", "Jansen", "1234567890"):
        assert secret not in caplog.text


async def test_dangling_references_reports_and_encounter_summaries(
    store: NodeStore, tmp_path: Path
) -> None:
    """A facility holds part of a record: references to elsewhere are kept, not errors."""
    encounter = {
        "resourceType": "Encounter",
        "id": "e1",
        "subject": {"reference": "urn:uuid:p1"},
        "type": [{"text": "Consult"}],
        "period": {"start": "1999-05-28T19:59:05-04:00"},
        "serviceProvider": {"reference": "urn:uuid:org-elsewhere", "display": "Elsewhere"},
    }
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "subject": {"reference": "urn:uuid:p1"},
        "encounter": {"reference": "urn:uuid:e1"},
        "performer": [{"reference": "Practitioner/not-here"}],
        "hasMember": [{"reference": "urn:uuid:not-here-either"}],
    }
    report = {
        "resourceType": "DiagnosticReport",
        "id": "r1",
        "subject": {"reference": "urn:uuid:p1"},
        "encounter": {"reference": "urn:uuid:e1"},
        "code": {"text": "Pathology report"},
        "issued": "2001-03-29T23:59:05.881+00:00",
        "presentedForm": [{"contentType": "text/plain", "data": "cmVwb3J0"}],
    }
    claim = {
        "resourceType": "Claim",
        "id": "c1",
        "patient": {"reference": "urn:uuid:p1"},
        "contained": [{"resourceType": "ServiceRequest", "id": "referral"}],
        "referral": {"reference": "#referral"},
        "item": [{"sequence": 1, "encounter": [{"reference": "urn:uuid:e1"}]}],
    }
    linked = {**note("n2", "p1"), "content": [{"attachment": {"url": "https://x.test/n2"}}]}
    resources = (dutch_patient("p1", "111222333"), encounter, observation, report, claim, linked)
    path = tmp_path / "part.json"
    path.write_text(json.dumps(bundle_of(*resources)))
    ingested = await ingest_file(store, path, PSEUDONYMS, BSN_SYSTEM)
    assert ingested.resources == 6 and ingested.documents == 2
    assert ingested.skipped == ["DocumentReference/n2: content 0 has no inline data"]

    (patient,) = await store.patients()
    documents = {d.document_id: d for d in await store.documents_of(patient.patient_key)}
    assert set(documents) == {"DiagnosticReport/r1", "Encounter/e1/summary"}
    summary = documents["Encounter/e1/summary"]
    assert summary.title == "Encounter summary: Consult"
    assert summary.created == "1999-05-28T23:59:05+00:00"
    assert summary.author_organisation == "Elsewhere"
    content = b"".join([c async for c in store.document_chunks(summary.document_id)])
    entries = [e["resource"] for e in json.loads(content)["entry"]]
    assert [(r["resourceType"], r["id"]) for r in entries] == [
        ("Encounter", "e1"),
        ("Observation", "o1"),
        ("DiagnosticReport", "r1"),
        ("Claim", "c1"),
    ]
    kept = entries[1]
    assert kept["subject"]["reference"] == "Patient/p1"
    assert kept["performer"][0]["reference"] == "Practitioner/not-here"
    assert kept["hasMember"][0]["reference"] == "urn:uuid:not-here-either"
    assert entries[3]["referral"]["reference"] == "#referral"
    text = b"".join([c async for c in store.document_chunks("DiagnosticReport/r1")])
    assert text == b"report" and documents["DiagnosticReport/r1"].title == "Pathology report"

    # The organisation arrives later, under the id of its urn:uuid: now it has a name.
    organisation = {"resourceType": "Organization", "id": "org-elsewhere", "name": "Found Later"}
    later = tmp_path / "providers.json"
    later.write_text(json.dumps(bundle_of(organisation, kind="batch")))
    await ingest_file(store, later, PSEUDONYMS, BSN_SYSTEM)
    again = await store.document(patient.patient_key, "Encounter/e1/summary")
    assert again is not None and again.author_organisation == "Found Later"


def test_batch_bundles_load_first(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(bundle_of()))
    (tmp_path / "z.json").write_text(json.dumps(bundle_of(kind="batch")))
    assert [p.name for p in bundle_files(tmp_path)] == ["z.json", "a.json"]


async def _counts(store: NodeStore) -> tuple[int, int, int, int]:
    return (
        await store.resource_count(),
        await store.document_count(),
        len(await store.patients()),
        await store.pending_index_count(),
    )
