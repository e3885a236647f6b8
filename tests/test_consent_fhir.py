"""Consent records as FHIR R4 Consent: the exact round trip, what is refused, the official examples.

Also ``consent import`` and ``consent export`` as an admin runs them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from node.consent import ConsentRecord, is_consent_id
from node.consent_fhir import (
    DATA_CATEGORY_SYSTEM,
    ORGANISATION_CATEGORY_SYSTEM,
    RECORDED_VIA_URL,
    URA_OID,
    URA_SYSTEM,
    WITHDRAWN_AT_URL,
    consents_from_json,
    from_fhir,
    organisation_id_of,
    organisation_references,
    to_bundle,
    to_fhir,
)
from node.records import BundleDraft, ResourceDraft
from node.store import NodeStore
from tests.test_consent import BSN_A, BSN_B, admin, cat, deny, listed, org, permit
from tests.test_consent import node as node  # the tmp node fixture, shared
from transmural.errors import InvalidInput

EXAMPLES = Path(__file__).resolve().parents[2] / "shared/data/hl7-fhir-r4-examples/r4-core"
PATIENT = "Patient/p-1"
#: What the node would know of Organization/f001 (a URA under its OID, as in the spec's f001).
F001 = {"Organization/f001": "91654"}

RECORDS = [
    permit(),
    deny(**org("URA-2"), period_end="2026-12-31"),
    permit(**cat("nursing-home"), data=frozenset({"medication", "allergies"})),
    deny(data=frozenset({"mental-health"}), recorded_via="portal",
         period_start="2025-03-01T08:30:00+01:00", period_end="2025-09-01T00:00:00Z"),
    permit(status="withdrawn", withdrawn_at="2025-05-05T10:00:00+00:00"),
]  # fmt: skip


def example(name: str) -> dict[str, Any]:
    path = EXAMPLES / f"Consent-consent-example-{name}.json"
    if not path.is_file():
        pytest.fail(f"official example {path} is missing: the project expects ../shared/data")
    return dict(json.loads(path.read_text()))


# --- our exports ---


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: f"{r.decision}-{r.actor_kind}")
def test_round_trip_is_exact(record: ConsentRecord) -> None:
    exported = to_fhir(record, PATIENT, "URA-1")
    assert from_fhir(exported, record.patient_key) == record
    assert to_fhir(from_fhir(exported, record.patient_key), PATIENT, "URA-1") == exported
    wire = json.loads(json.dumps(exported))
    assert from_fhir(wire, record.patient_key) == record


def test_export_is_an_r4_patient_privacy_consent() -> None:
    record = deny(**org("URA-2"), data=frozenset({"notes", "imaging"}), period_end="2026-01-01")
    resource = to_fhir(record, PATIENT, "URA-1")
    assert resource["resourceType"] == "Consent" and resource["id"] == record.consent_id
    assert resource["status"] == "active"
    assert resource["scope"]["coding"][0]["code"] == "patient-privacy"
    assert resource["category"] == [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}]
    assert resource["patient"] == {"reference": PATIENT}
    assert resource["dateTime"] == record.recorded_at
    assert resource["performer"] == [{"display": "desk clerk"}]
    assert resource["organization"] == [{"identifier": {"system": URA_SYSTEM, "value": "URA-1"}}]
    assert {"url": RECORDED_VIA_URL, "valueCode": "desk"} in resource["extension"]
    assert resource["policyRule"]["coding"][0]["code"] == "OPTOUT"
    provision = resource["provision"]
    assert provision["type"] == "deny"
    assert provision["period"] == {"start": "2025-01-01", "end": "2026-01-01"}
    (actor,) = provision["actor"]
    assert actor["role"]["coding"][0]["code"] == "IRCP"
    assert actor["reference"] == {"identifier": {"system": URA_SYSTEM, "value": "URA-2"}}
    assert provision["code"] == [
        {"coding": [{"system": DATA_CATEGORY_SYSTEM, "code": code}]}
        for code in ("imaging", "notes")
    ]
    assert "deny organisation URA-2 imaging, notes" in resource["text"]["div"]


def test_export_of_a_category_and_of_a_withdrawn_consent() -> None:
    resource = to_fhir(permit(**cat("gp")), PATIENT, "")
    assert "organization" not in resource
    assert resource["provision"]["actor"][0]["reference"]["identifier"] == {
        "system": ORGANISATION_CATEGORY_SYSTEM, "value": "gp"
    }  # fmt: skip
    withdrawn = to_fhir(RECORDS[-1], PATIENT, "URA-1")
    assert withdrawn["status"] == "inactive"
    assert {"url": WITHDRAWN_AT_URL, "valueDateTime": "2025-05-05T10:00:00+00:00"} in withdrawn[
        "extension"
    ]


def test_bundle_round_trip_keeps_our_ids() -> None:
    bundle = to_bundle(RECORDS, PATIENT, "URA-1")
    assert bundle["type"] == "collection" and len(bundle["entry"]) == len(RECORDS)
    assert consents_from_json(json.loads(json.dumps(bundle)), 1) == RECORDS


# --- import: what is read, what is refused ---


def test_foreign_ids_get_a_new_consent_id() -> None:
    resource = to_fhir(permit(), PATIENT, "URA-1") | {"id": "consent-from-elsewhere"}
    assert is_consent_id(from_fhir(resource, 1).consent_id)


def test_organisation_by_ura_oid_or_known_literal_reference() -> None:
    resource = to_fhir(deny(**org("x")), PATIENT, "")
    resource["provision"]["actor"][0]["reference"] = {
        "identifier": {"system": URA_OID, "value": "91654"}
    }
    assert from_fhir(resource, 1).actor == "91654"
    resource["provision"]["actor"][0]["reference"] = {"reference": "Organization/f001"}
    assert from_fhir(resource, 1, organisations=F001).actor == "91654"
    with pytest.raises(InvalidInput, match="Organization/f001: no organisation id"):
        from_fhir(resource, 1)


def test_missing_performer_type_and_period_take_the_documented_defaults() -> None:
    resource = to_fhir(permit(), PATIENT, "")
    for key in ("performer", "extension"):
        del resource[key]
    del resource["provision"]["type"]
    del resource["provision"]["period"]
    record = from_fhir(resource, 1, recorded_by="importer")
    assert (record.decision, record.recorded_by, record.recorded_via) == (
        "permit",
        "importer",
        "desk",
    )
    assert record.period_start == record.recorded_at


def break_it(resource: dict[str, Any], change: str) -> None:
    provision = resource["provision"]
    match change:
        case "modifierExtension":
            resource["modifierExtension"] = [{"url": "http://example.org/x", "valueBoolean": True}]
        case "policy":
            resource["policy"] = [{"uri": "http://example.org/policy"}]
        case "status":
            resource["status"] = "draft"
        case "scope":
            resource["scope"] = {"coding": [{"code": "research"}]}
        case "dateTime":
            del resource["dateTime"]
        case "inactive":
            resource["status"] = "inactive"
        case "provision.dataPeriod":
            provision["dataPeriod"] = {"start": "2020-01-01"}
        case "provision.action":
            provision["action"] = [{"coding": [{"code": "correct"}]}]
        case "provision.code[0]":
            provision["code"] = [{"coding": [{"system": "http://loinc.org", "code": "11502-2"}]}]
        case "provision.actor":
            provision["actor"] = [provision["actor"][0], provision["actor"][0]]
        case "provision.actor[0].reference":
            provision["actor"][0]["reference"] = {"reference": "Practitioner/dr-no"}
        case "provision.actor[0].role":
            provision["actor"][0]["role"] = {"coding": [{"code": "CST"}]}
        case "policyRule":
            del provision["type"]
            resource["policyRule"] = {"coding": [{"code": "OPTINR"}]}
        case "friends":
            resource["friends"] = ["not FHIR"]


@pytest.mark.parametrize(
    "change",
    ["modifierExtension", "policy", "status", "scope", "dateTime", "inactive",
     "provision.dataPeriod", "provision.action", "provision.code[0]", "provision.actor",
     "provision.actor[0].reference", "provision.actor[0].role", "policyRule", "friends"],
)  # fmt: skip
def test_what_cannot_be_represented_is_refused_by_element(change: str) -> None:
    resource = to_fhir(deny(**org("URA-2")), PATIENT, "URA-1")
    break_it(resource, change)
    element = "status" if change == "inactive" else change
    with pytest.raises(InvalidInput, match=rf"^my\.json: cannot import: .*{re.escape(element)}"):
        from_fhir(resource, 1, where="my.json")


def test_not_a_consent_is_refused() -> None:
    for thing in ({"resourceType": "Patient"}, [], "Consent"):
        with pytest.raises(InvalidInput, match="not a FHIR Consent"):
            from_fhir(thing, 1)


def test_a_bundle_imports_all_or_nothing_and_names_each_problem() -> None:
    good = to_fhir(permit(), PATIENT, "")
    bad = to_fhir(permit(), PATIENT, "") | {"status": "proposed"}
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": good}, {"resource": bad}, {"resource": {"resourceType": "Patient"}}],
    }
    with pytest.raises(InvalidInput) as refused:
        consents_from_json(bundle, 1, source="in.json")
    lines = str(refused.value).splitlines()
    assert lines == [
        "in.json entry[1]: cannot import: status: 'proposed': only active and inactive "
        "(withdrawn) consents",
        "in.json entry[2]: not a FHIR Consent resource",
    ]
    other = to_fhir(deny(), "Patient/p-2", "")
    with pytest.raises(InvalidInput, match="more than one patient"):
        consents_from_json(
            {"resourceType": "Bundle", "entry": [{"resource": good}, {"resource": other}]}, 1
        )
    with pytest.raises(InvalidInput, match="holds no Consent"):
        consents_from_json({"resourceType": "Bundle", "type": "collection"}, 1)


def test_organisation_lookups() -> None:
    assert organisation_references(example("notOrg")) == {"Organization/f001"}
    assert organisation_references(example("Emergency")) == {"Organization/f001"}
    assert organisation_references(example("basic")) == set()
    assert (
        organisation_id_of(
            {
                "identifier": [
                    {"system": "urn:oid:2.16.840.1.113883.2.4.6.1", "value": "17-0112278"},
                    {"system": URA_OID, "value": "91654"},
                ]
            }
        )
        == "91654"
    )
    assert organisation_id_of(None) is None


# --- the official R4 examples (list in node.consent_fhir's docstring) ---

IMPORTED = {
    "basic": ("permit", "all", "", "1964-01-01", "2016-01-01"),
    "notTime": ("permit", "all", "", "2015-01-01", "2015-02-01"),
    "notOrg": ("deny", "organisation", "91654", "2015-11-18", None),
}
REFUSED = {
    "Out": ["provision.actor[0].role: v3-ParticipationType CST"],
    "notAuthor": ["provision.actor[0].role: v3-ParticipationType CST"],
    "notThem": ["provision.actor[0].reference: Practitioner/f204"],
    "notThis": ["provision.data: "],
    "Emergency": ["category[0]: v3-ActCode EMRGONLY", "provision.purpose", "provision.provision"],
    "grantor": ["category[0]: v3-ActCode INFAO", "provision.actor: 2 actors"],
    "signature": ["category[0]: consentcategorycodes npp", "provision.provision",
                  "provision.actor[0].reference: Practitioner/13"],
    "smartonfhir": ["provision.provision: nested provisions"],
    "pkb": ["provision.provision", "provision.securityLabel"],
}  # fmt: skip


def test_the_list_covers_every_official_example() -> None:
    names = {p.name.removeprefix("Consent-consent-example-").removesuffix(".json")
             for p in EXAMPLES.glob("Consent-*.json")}  # fmt: skip
    assert names == set(IMPORTED) | set(REFUSED)
    assert len(names) == 12


@pytest.mark.parametrize("name", sorted(IMPORTED))
def test_official_example_imports(name: str) -> None:
    record = from_fhir(example(name), 7, organisations=F001)
    fields = (record.decision, record.actor_kind, record.actor, record.period_start,
              record.period_end)  # fmt: skip
    assert fields == IMPORTED[name]
    assert record.data == frozenset() and record.status == "active" and record.patient_key == 7
    assert (record.recorded_by, record.recorded_via) == ("FHIR import", "desk")
    exported = to_fhir(record, "Patient/f001", "URA-1")
    assert from_fhir(exported, 7) == record


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_official_example_is_refused_naming_the_elements(name: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        from_fhir(example(name), 7, organisations=F001, where=f"{name}.json")
    message = str(refused.value)
    assert message.startswith(f"{name}.json: cannot import: ")
    for element in REFUSED[name]:
        assert element in message


def test_not_org_needs_the_organisations_id() -> None:
    with pytest.raises(InvalidInput, match="Organization/f001: no organisation id"):
        from_fhir(example("notOrg"), 7)


# --- consent import / export on a tmp node ---


async def add_f001(config: Path) -> None:
    """The node knows Organization/f001 and its URA (as ingest would store it)."""
    organisation = {"resourceType": "Organization", "id": "f001",
                    "identifier": [{"system": URA_OID, "value": "91654"}]}  # fmt: skip
    store = await NodeStore.open(config.parent / "node.db")
    try:
        draft = ResourceDraft("Organization", "f001", None, json.dumps(organisation), "Burgers",
                              ((URA_OID, "91654"),))  # fmt: skip
        await store.write_bundle(BundleDraft("org.json", [], [draft], [], [], pseudonymised=False))
    finally:
        await store.close()


async def test_cli_import_official_examples(node: Path, tmp_path: Path) -> None:
    await add_f001(node)
    # The examples name their own Patient/f001; these are recorded for our patient,
    # named by identifier (a Consent naming another patient is refused).
    ours = {"identifier": {"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": BSN_A}}
    resources = [{**example(n), "patient": ours} for n in ("basic", "notOrg")]
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": r} for r in resources]}  # fmt: skip
    file = tmp_path / "consents.json"
    file.write_text(json.dumps(bundle))
    done = admin("consent", "import", "--config", node, BSN_A, file)
    assert done.returncode == 0, done.stderr
    assert "imported 2 consents" in done.stdout
    imported = [(r["decision"], r["actor"]) for r in listed(node)]
    assert imported == [("permit", ""), ("deny", "91654")]  # in the Bundle's order

    refused = tmp_path / "emergency.json"
    # Named for our patient, so what is refused is the mapping, not the patient.
    ours = {"identifier": {"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": BSN_B}}
    refused.write_text(json.dumps({**example("Emergency"), "patient": ours}))
    done = admin("consent", "import", "--config", node, BSN_B, refused)
    assert done.returncode == 2
    assert f"{refused}: cannot import: category[0]" in done.stderr
    mixed = tmp_path / "mixed.json"
    for_b = {"identifier": {"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": BSN_B}}
    entries = [{"resource": {**r, "patient": for_b}} for r in (*resources, example("pkb"))]
    mixed.write_text(json.dumps({**bundle, "entry": entries}))
    done = admin("consent", "import", "--config", node, BSN_B, mixed)
    assert done.returncode == 2 and "entry[2]: cannot import" in done.stderr
    assert listed(node, BSN_B) == []  # all or nothing
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    done = admin("consent", "import", "--config", node, BSN_B, broken)
    assert done.returncode == 2 and "not JSON" in done.stderr


async def test_cli_export_then_import_elsewhere_is_identical(
    node: Path,
    tmp_path: Path,
) -> None:
    for args in (["--permit"], ["--deny", "--category", "pharmacy", "--data", "notes"]):
        done = admin("consent", "add", "--config", node, BSN_A, *args, "--recorded-by", "desk")
        assert done.returncode == 0, done.stderr
    first = listed(node)
    done = admin("consent", "withdraw", "--config", node, first[0]["consent_id"])
    assert done.returncode == 0, done.stderr
    exported = admin("consent", "export", "--config", node, BSN_A)
    assert exported.returncode == 0, exported.stderr
    bundle = json.loads(exported.stdout)
    assert [e["resource"]["status"] for e in bundle["entry"]] == ["inactive", "active"]

    file = tmp_path / "export.json"
    file.write_text(exported.stdout)
    again = admin("consent", "import", "--config", node, BSN_B, file)
    assert again.returncode == 2 and "not this patient" in again.stderr  # A's, not B's
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = await _other_node(elsewhere)
    done = admin("consent", "import", "--config", other, BSN_A, file)
    assert done.returncode == 0, done.stderr
    assert listed(other) == listed(node)
    assert json.loads(admin("consent", "export", "--config", other, BSN_A).stdout) == bundle


async def _other_node(folder: Path) -> Path:
    from tests.test_consent import add_patients, node_config

    config = node_config(folder)
    store = await NodeStore.open(folder / "node.db")
    try:
        await add_patients(store, BSN_A)
    finally:
        await store.close()
    return config


async def test_cli_import_refuses_a_consent_for_another_patient(node: Path, tmp_path: Path) -> None:
    file = tmp_path / "consent.json"
    file.write_text(json.dumps(example("basic")))  # names Patient/f001, not BSN_A's patient
    done = admin("consent", "import", "--config", node, BSN_A, file)
    assert done.returncode == 2
    assert "names Patient/f001, not this patient" in done.stderr
