"""The live report (issue 5), node side: each holder's structured entries over real gRPC.

node-1's physician calls ``Gateway/Report`` as the thin client does; each
holder answers ``Peer/FindItems`` under the patient's consent there. The
first tests read entries out of hand-built resources (``items_from``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node.answers import Requester
from node.categories import DATA_CATEGORIES
from node.clinical_items import ClinicalItem, extract, items_from
from node.consent import ConsentDecision
from node.consent_desk import ConsentDesk
from node.holder import Origin, RecordHolder, _shared_items
from tests.conftest import (
    CLINICIAN_ID,
    NetworkFactory,
    RunningNetwork,
    shared_data,
    start_silent_peer,
)
from tests.test_consent_network import consent, record, two_facility_patient
from tests.test_search import at_least, bsn_of
from tools.spread import SpreadPlan
from transmural import pki, transport
from transmural.identifiers import BSN_SYSTEM, US_SSN_SYSTEM, canonical
from transmural.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
SECTION_OF = {
    "Condition": "problems", "MedicationRequest": "medication", "AllergyIntolerance": "allergies",
    "Observation": "results", "Encounter": "encounters", "Procedure": "procedures",
    "Immunization": "immunisations",
}  # fmt: skip


# --- items_from, on hand-built resources ---


def concept(*codings: tuple[str, str, str], text: str = "") -> dict[str, Any]:
    found: dict[str, Any] = {
        "coding": [{"system": s, "code": c, "display": d} for s, c, d in codings]
    }
    return {**found, "text": text} if text else found


def observation(category: str, **fields: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": "o1", "status": "final",
        "category": [concept(("http://terminology.hl7.org/CodeSystem/observation-category",
                              category, category))],
        "code": concept((LOINC, "85354-9", "Blood pressure panel")), **fields,
    }  # fmt: skip


def only(resource: dict[str, Any]) -> ClinicalItem:
    items = items_from([resource])
    assert len(items) == 1, items
    return items[0]


def test_blood_pressure_is_one_entry_systolic_first() -> None:
    bp = observation(
        "vital-signs",
        effectiveDateTime="2020-06-15T10:00:00+02:00",
        component=[  # Synthea writes diastolic first
            {"code": concept((LOINC, "8462-4", "Diastolic")),
             "valueQuantity": {"value": 80, "unit": "mm[Hg]"}},
            {"code": concept((LOINC, "8480-6", "Systolic")),
             "valueQuantity": {"value": 120.5, "unit": "mm[Hg]"}},
        ],
    )  # fmt: skip

    item = only(bp)

    assert (item.section, item.code_system, item.code) == ("results", LOINC, "85354-9")
    assert (item.value, item.unit) == ("120.5/80", "mm[Hg]")
    assert item.date == "2020-06-15T08:00:00+00:00", "date-times are normalised to UTC"
    assert item.resource_id == "Observation/o1"
    assert json.loads(item.resource_json) == bp


def test_components_with_different_units_keep_their_units() -> None:
    item = only(
        observation("laboratory", component=[
            {"code": concept((LOINC, "1", "a")), "valueQuantity": {"value": 2, "unit": "kg"}},
            {"code": concept((LOINC, "2", "b")), "valueQuantity": {"value": 3, "code": "cm"}},
        ])
    )  # fmt: skip
    assert (item.value, item.unit) == ("2 kg / 3 cm", "")


def test_coded_value_is_its_text_and_missing_dates_stay_empty() -> None:
    smoker = observation(
        "laboratory",
        valueCodeableConcept=concept((SNOMED, "266919005", "Never smoked tobacco")),
    )
    item = only(smoker)
    assert (item.value, item.unit, item.date) == ("Never smoked tobacco", "", "")


def test_known_system_wins_else_first_coding() -> None:
    mixed = {
        "resourceType": "Condition", "id": "c1",
        "clinicalStatus": concept(("http://terminology.hl7.org/CodeSystem/condition-clinical",
                                   "resolved", "Resolved")),
        "code": concept(("urn:local", "X1", "Local"), (SNOMED, "44054006", "Diabetes")),
        "onsetDateTime": "2001-03",
    }  # fmt: skip
    unknown = {
        "resourceType": "Procedure", "id": "p1", "status": "completed",
        "code": concept(("urn:local", "", "no code"), ("urn:other", "P9", ""), text="Thing"),
        "performedPeriod": {"start": "2019-01-02T03:04:05Z"},
    }  # fmt: skip

    condition, procedure = items_from([mixed, unknown])

    assert (condition.section, condition.code_system, condition.code) == (
        "problems", SNOMED, "44054006",
    )  # fmt: skip
    assert (condition.status, condition.date) == ("resolved", "2001-03")
    assert (procedure.code_system, procedure.code, procedure.display) == (
        "urn:other",
        "P9",
        "Thing",
    )
    assert procedure.date == "2019-01-02T03:04:05+00:00"


def test_resources_without_a_code_are_counted_others_ignored() -> None:
    no_code = {"resourceType": "MedicationRequest", "id": "m1", "status": "active",
               "medicationReference": {"reference": "Medication/x"}}  # fmt: skip
    text_only = {"resourceType": "Immunization", "id": "i1", "vaccineCode": {"text": "flu"}}
    survey = observation("survey")
    claim = {"resourceType": "Claim", "id": "cl1"}
    untyped = {"resourceType": "Encounter", "id": "e1", "status": "finished",
               "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                         "code": "EMER"},
               "period": {"start": "2018-05-06"}}  # fmt: skip

    found = extract([no_code, text_only, survey, claim, untyped])

    assert found.skipped == 2
    assert [(i.section, i.code, i.date) for i in found.items] == [
        ("encounters", "EMER", "2018-05-06")
    ], "an encounter without a type still counts, by its class"


def test_uncategorised_entries_follow_the_decision() -> None:
    """A vital sign (no data category) goes unless every category is denied."""
    vital = observation("vital-signs", valueQuantity={"value": 37, "unit": "Cel"})
    drug = {"resourceType": "MedicationRequest", "id": "m2", "status": "active",
            "medicationCodeableConcept": concept(("http://www.nlm.nih.gov/research/umls/rxnorm",
                                                  "1", "pill"))}  # fmt: skip
    some = ConsentDecision(True, frozenset({"medication"}), "deny medication")
    every = ConsentDecision(True, frozenset(DATA_CATEGORIES), "deny all")

    assert [i.section for i in _shared_items([vital, drug], some).items] == ["results"]
    assert _shared_items([vital, drug], every).items == []


# --- over the network ---


async def gateway_report(
    net: RunningNetwork, patient: str, system: str = "", deadline_ms: int = 0
) -> tuple[gateway_pb2.Located, dict[str, gateway_pb2.FacilityItems]]:
    """A raw Report on node-1's gateway, as the thin client sends it: holders, answers."""
    assert net.ca_pem is not None
    node = net.nodes[0]
    channel = transport.open_channel(
        node.gateway_address, transport.TlsFiles(net.ca_pem),
        pki.node_dns_name(node.config.node_id),
    )  # fmt: skip
    request = gateway_pb2.SearchRequest(
        patient=common_pb2.PatientIdentifier(system=system, value=patient),
        purpose_of_use="treatment",
        deadline_ms=deadline_ms,
    )
    try:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        call = stub.Report(
            request, timeout=30, metadata=(("authorization", f"Bearer {net.tokens[0]}"),)
        )
        events = [event async for event in call]
    finally:
        await channel.close()
    assert events and events[0].WhichOneof("event") == "located", "the stream opens with holders"
    answers: dict[str, gateway_pb2.FacilityItems] = {}
    for event in events[1:]:
        assert event.WhichOneof("event") == "items"
        assert event.items.facility.node_id not in answers, "a facility answered twice"
        answers[event.items.facility.node_id] = event.items
    return events[0].located, answers


def report_resources(bundle: Path) -> dict[str, str]:
    """``Type/id`` -> section of every resource of the bundle the report should show."""
    expected = {}
    for entry in json.loads(bundle.read_bytes())["entry"]:
        resource = entry["resource"]
        kind = resource["resourceType"]
        if kind not in SECTION_OF:
            continue
        if kind == "Observation":
            codes = {c["code"] for cat in resource.get("category", []) for c in cat["coding"]}
            if not codes & {"laboratory", "vital-signs", "vital-sign"}:
                continue
        expected[f"{kind}/{resource['id']}"] = SECTION_OF[kind]
    return expected


def ids_of(answer: gateway_pb2.FacilityItems, section: str = "") -> set[str]:
    return {i.resource_id for i in answer.items if not section or i.section == section}


async def test_report_holds_every_entry_of_every_holder(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net = await network(n=3)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    fhir_id = at_least(plan, 2)[0]
    expected = report_resources(synthetic_bundles / plan.patients[fhir_id].file)

    located, answers = await gateway_report(net, bsn_of(plan, fhir_id))

    holders = {f"node-{i + 1}" for i in plan.patients[fhir_id].nodes}
    assert {h.node_id for h in located.holders} == holders == set(answers)
    got: dict[str, str] = {}
    for node_id, answer in answers.items():
        assert answer.status == common_pb2.FACILITY_STATUS_OK, (node_id, answer.message)
        assert answer.items, f"{node_id} answered ok without entries"
        for item in answer.items:
            assert item.resource_id not in got, f"{item.resource_id} came from two facilities"
            got[item.resource_id] = item.section
            assert item.code and item.code_system and item.date[:2] in ("19", "20")
            stored = json.loads(item.resource_json)
            assert f"{stored['resourceType']}/{stored['id']}" == item.resource_id
    assert got == expected, "every entry of the patient's record, each in its section"
    assert {"problems", "medication", "results", "encounters"} <= set(got.values())

    # Both sides logged the report under one correlation id; no document ids.
    pseudonym = net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn_of(plan, fhir_id))).hex()
    for node_id in holders:
        node = net.nodes[int(node_id.split("-")[1]) - 1]
        records = await node.audit.export(None, pseudonym)
        answering = [r for r in records if r.action == "report" and r.side == "answering"]
        assert answering[-1].correlation_id == located.correlation_id
        assert answering[-1].document_ids == []
        assert answering[-1].outcome_reason.startswith(f"{len(answers[node_id].items)} items")
    asking = [r for r in await net.nodes[0].audit.export(None, pseudonym) if r.side == "asking"]
    assert {r.action for r in asking if r.correlation_id == located.correlation_id} == {
        "report", "report-answer",
    }  # fmt: skip


async def test_data_category_deny_removes_exactly_its_entries(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net = await network(n=2)
    bsn, key = await two_facility_patient(net, synthetic_bundles)
    desk = ConsentDesk(net.nodes[1].store)
    await record(net, consent(desk, key, True))
    _, before = await gateway_report(net, bsn)
    medication = ids_of(before["node-2"], "medication")
    assert medication, "the patient must have medication at node-2 for this test"

    await record(net, consent(desk, key, False, data=frozenset({"medication"})))
    _, after = await gateway_report(net, bsn)

    assert after["node-2"].status == common_pb2.FACILITY_STATUS_OK
    assert ids_of(after["node-2"]) == ids_of(before["node-2"]) - medication


async def test_consent_denied_facility_sends_no_entries(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net = await network(n=2)
    bsn, key = await two_facility_patient(net, synthetic_bundles)
    desk = ConsentDesk(net.nodes[1].store)
    asker = net.nodes[0].config.organisation_id
    await record(
        net, consent(desk, key, True),
        consent(desk, key, False, actor_kind="organisation", actor=asker),
    )  # fmt: skip

    _, answers = await gateway_report(net, bsn)

    denied = answers["node-2"]
    assert denied.status == common_pb2.FACILITY_STATUS_CONSENT_DENIED
    assert list(denied.items) == [] and denied.message == ""
    logged = [r for r in await net.nodes[1].audit.export(key, "") if r.action == "report"]
    assert logged[-1].outcome == "denied" and logged[-1].outcome_reason == "consent"


async def test_a_silent_facility_times_out_without_holding_back_the_others(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net = await network(n=2)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    bsn = bsn_of(plan, sorted(plan.patients)[0])
    pseudonym = net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn))
    hung = await start_silent_peer(net, "FindItems", pseudonym)
    try:
        _, answers = await gateway_report(net, bsn, deadline_ms=300)
    finally:
        await hung.stop(0)

    assert answers["hung"].status == common_pb2.FACILITY_STATUS_TIMEOUT
    assert 250 <= answers["hung"].elapsed_ms < 2000 and not answers["hung"].items
    others = [a for n, a in answers.items() if n != "hung"]
    assert others and all(a.status == common_pb2.FACILITY_STATUS_OK for a in others)


async def test_unknown_pseudonym_is_no_record(network: NetworkFactory) -> None:
    net = await network(n=1)
    node = net.nodes[0]
    holder = RecordHolder(node.store, node.audit, node.consent_policy)
    requester = Requester(CLINICIAN_ID, "Dr. Test", "physician", "URA-1", "treatment")

    answer = await holder.find_items(bytes(32), requester, Origin("node-9", "test", "c-1"))

    assert (answer.status, answer.items) == ("no-record", [])


async def test_synthea_report_holds_every_encounter_of_a_spread_patient(
    network: NetworkFactory,
) -> None:
    net = await network(n=3, national_system=US_SSN_SYSTEM)
    source = shared_data("synthea-smart-r4") / "bundles"
    plan: SpreadPlan = await net.load(source)
    await net.consent_all(True)
    fhir_id = next(f for f, p in sorted(plan.patients.items()) if len(p.nodes) >= 2)
    ssn = next(v for s, v in plan.patients[fhir_id].identifiers if s == US_SSN_SYSTEM)
    encounters = {
        k for k, section in report_resources(source / plan.patients[fhir_id].file).items()
        if section == "encounters"
    }  # fmt: skip

    _, answers = await gateway_report(net, ssn, US_SSN_SYSTEM, deadline_ms=15_000)

    ok = {n: a for n, a in answers.items() if a.status == common_pb2.FACILITY_STATUS_OK}
    assert len(ok) >= 2 and all(a.items for a in ok.values()), answers.keys()
    found = [i.resource_id for a in ok.values() for i in a.items if i.section == "encounters"]
    assert len(found) == len(set(found)), "no encounter reported by two facilities"
    assert set(found) == encounters, "every encounter of the source bundle, none lost"
    assert all(ids_of(a, "encounters") for a in ok.values()), "each facility saw the patient"
