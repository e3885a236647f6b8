"""The demo's synthetic Dutch data: repeatable, valid, and spread like real care."""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tools.spread import national_system, spread
from tools.synthetic import URA_SYSTEM, fhir_datetime, generate
from transmural.identifiers import BSN_SYSTEM, canonical_bsn

Json = dict[str, Any]
DATETIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def bundles(files: list[Path]) -> list[Json]:
    return [json.loads(path.read_text(encoding="utf-8")) for path in files]


def resources(bundle: Json, kind: str) -> list[Json]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield item
            else:
                yield from references(item)
    elif isinstance(value, list):
        for item in value:
            yield from references(item)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, files: list[Path]) -> None:
    again = generate(tmp_path / "again")
    assert [p.name for p in again] == [p.name for p in files]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(again, files, strict=True))
    other = generate(tmp_path / "other", patients=3, seed=8)
    assert len(other) == 3
    assert {p.name for p in other}.isdisjoint(p.name for p in files)


def test_bundles_are_transactions_whose_references_resolve(bundles: list[Json]) -> None:
    assert len(bundles) == 12
    for bundle in bundles:
        assert bundle["resourceType"] == "Bundle"
        assert bundle["type"] == "transaction"
        urls = [e["fullUrl"] for e in bundle["entry"]]
        assert len(urls) == len(set(urls))
        for entry in bundle["entry"]:
            resource = entry["resource"]
            assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
            assert entry["request"]["method"] == "POST"
            assert entry["request"]["url"] == resource["resourceType"]
        refs = set(references([e["resource"] for e in bundle["entry"]]))
        assert refs
        assert all(ref.startswith("urn:uuid:") for ref in refs)
        assert refs <= set(urls)


def test_file_names_follow_synthea(files: list[Path], bundles: list[Json]) -> None:
    for path, bundle in zip(files, bundles, strict=True):
        patient = resources(bundle, "Patient")[0]
        name = patient["name"][0]
        family = name["family"].replace(" ", "-")
        assert path.name == f"{name['given'][0]}_{family}_{patient['id']}.json"
        assert re.fullmatch(UUID, patient["id"])


def test_every_bsn_passes_the_eleven_check(bundles: list[Json]) -> None:
    bsns = []
    for bundle in bundles:
        (patient,) = resources(bundle, "Patient")
        ids = {i["system"]: i["value"] for i in patient["identifier"]}
        assert ids[BSN_SYSTEM] == canonical_bsn(ids[BSN_SYSTEM])
        assert len([i for i in patient["identifier"] if i.get("type")]) == 1  # the MRN
        assert patient["gender"] in ("female", "male")
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", patient["birthDate"])
        bsns.append(ids[BSN_SYSTEM])
    assert len(set(bsns)) == len(bsns)


def test_organisations_are_shared_with_ura_numbers(bundles: list[Json]) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for bundle in bundles:
        for org in resources(bundle, "Organization"):
            (ident,) = org["identifier"]
            assert ident["system"] == URA_SYSTEM
            assert re.fullmatch(r"\d{8}", ident["value"])
            assert seen.setdefault(org["id"], (ident["value"], org["name"])) == (
                ident["value"],
                org["name"],
            )
    assert 4 <= len(seen) <= 5
    names = " ".join(name for _, name in seen.values())
    for word in ("Ziekenhuis", "Huisartsenpraktijk", "Apotheek"):
        assert word in names


def test_each_patient_has_three_to_eight_encounters_at_one_to_three_places(
    bundles: list[Json],
) -> None:
    places: Counter[int] = Counter()
    for bundle in bundles:
        encounters = resources(bundle, "Encounter")
        assert 3 <= len(encounters) <= 8
        providers = {e["serviceProvider"]["reference"] for e in encounters}
        places[len(providers)] += 1
        for encounter in encounters:
            assert DATETIME.match(encounter["period"]["start"])
            assert DATETIME.match(encounter["period"]["end"])
    assert places[1] > 0
    assert places[2] + places[3] > places[1]


def test_clinical_content_is_coded(bundles: list[Json]) -> None:
    kinds = Counter(e["resource"]["resourceType"] for b in bundles for e in b["entry"])
    for kind in ("Observation", "Condition", "MedicationRequest", "Immunization"):
        assert kinds[kind] > 0, kind
    assert kinds["AllergyIntolerance"] > 0
    for bundle in bundles:
        for obs in resources(bundle, "Observation"):
            assert obs["code"]["coding"][0]["system"] == "http://loinc.org"
            assert isinstance(obs["valueQuantity"]["value"], int | float)
            assert DATETIME.match(obs["effectiveDateTime"])
        for condition in resources(bundle, "Condition"):
            assert condition["code"]["coding"][0]["system"] == "http://snomed.info/sct"
        for request in resources(bundle, "MedicationRequest"):
            coding = request["medicationCodeableConcept"]["coding"][0]
            assert coding["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"
        for shot in resources(bundle, "Immunization"):
            assert shot["vaccineCode"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/cvx"


def test_one_plain_text_progress_note_per_encounter(bundles: list[Json]) -> None:
    for bundle in bundles:
        encounters = {f"urn:uuid:{e['id']}": e for e in resources(bundle, "Encounter")}
        notes = resources(bundle, "DocumentReference")
        assert sorted(n["context"]["encounter"][0]["reference"] for n in notes) == sorted(
            encounters
        )
        for note in notes:
            encounter = encounters[note["context"]["encounter"][0]["reference"]]
            assert note["custodian"]["reference"] == encounter["serviceProvider"]["reference"]
            assert note["type"]["coding"][0] == {
                "system": "http://loinc.org",
                "code": "11506-3",
                "display": "Progress note",
            }
            attachment = note["content"][0]["attachment"]
            assert attachment["contentType"] == "text/plain; charset=utf-8"
            text = base64.b64decode(attachment["data"], validate=True).decode("utf-8")
            assert text.startswith("Voortgangsverslag")
            assert "S: " in text and "P: " in text


def test_spread_over_three_nodes_gives_patients_at_one_two_and_three(
    files: list[Path], tmp_path: Path
) -> None:
    plan = spread(files[0].parent, [tmp_path / f"node-{i}" for i in range(3)])
    at = Counter(len(p.nodes) for p in plan.patients.values())
    assert at[1] > 0
    assert at[2] > 0
    assert at[3] > 0
    assert national_system(plan) == BSN_SYSTEM
    assert all(share.organisations for share in plan.nodes)


@pytest.mark.parametrize(
    ("moment", "offset"),
    [
        (datetime(2024, 3, 30, 12), "+01:00"),
        (datetime(2024, 3, 31, 12), "+02:00"),
        (datetime(2024, 10, 26, 12), "+02:00"),
        (datetime(2024, 10, 27, 12), "+01:00"),
        (datetime(2023, 1, 15, 9, 30), "+01:00"),
    ],
)
def test_dates_carry_the_amsterdam_offset(moment: datetime, offset: str) -> None:
    text = fhir_datetime(moment)
    assert DATETIME.match(text)
    assert text.endswith(offset)
