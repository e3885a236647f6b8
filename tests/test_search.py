"""Flow 4 and 5: a clinician's search fans out; each holder answers for itself."""

from __future__ import annotations

import hashlib
import io
import logging
import re

import pytest

from tests.conftest import NetworkFactory, collect, node_tls, publish_as, start_silent_peer
from tools.gateway_client import ClientError, FacilityResult, Holders
from tools.render import facility_line, holders_line, search_json
from tools.spread import SpreadPlan
from transmural.identifiers import BSN_SYSTEM, canonical


def bsn_of(plan: SpreadPlan, fhir_id: str) -> str:
    for system, value in plan.patients[fhir_id].identifiers:
        if system == BSN_SYSTEM:
            return value
    raise AssertionError(f"patient {fhir_id} has no BSN")


def at_least(plan: SpreadPlan, facilities: int) -> list[str]:
    return sorted(f for f, p in plan.patients.items() if len(p.nodes) >= facilities)


async def test_search_reaches_every_holder(network: NetworkFactory, synthetic_bundles) -> None:
    net = await network(n=3)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    fhir_id = at_least(plan, 2)[0]
    expected = {f"node-{i + 1}" for i in plan.patients[fhir_id].nodes}

    holders, results = await collect(net.client(0), bsn_of(plan, fhir_id))

    assert set(holders.node_ids) == expected
    assert set(results) == expected
    for result in results.values():
        assert result.status == "ok", result
        assert result.documents, f"{result.node_id} answered ok without documents"
    # Each facility lists only its own documents: none appears twice.
    ids = [d.document_id for r in results.values() for d in r.documents]
    assert len(ids) == len(set(ids))


async def test_consent_denied_gives_no_metadata(network: NetworkFactory, synthetic_bundles) -> None:
    net = await network(n=3)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    fhir_id = at_least(plan, 2)[0]
    index = plan.patients[fhir_id].nodes[-1]
    refusing = net.nodes[index]
    asker = net.nodes[0].config.organisation_id
    await net.deny_organisation(index, bsn_of(plan, fhir_id), asker)

    _, results = await collect(net.client(0), bsn_of(plan, fhir_id))

    denied = results[refusing.config.node_id]
    assert denied.status == "consent-denied"
    assert denied.documents == []
    others = [r for n, r in results.items() if n != refusing.config.node_id]
    assert others and all(r.status == "ok" and r.documents for r in others)


async def test_unknown_patient_has_no_holders(network: NetworkFactory, synthetic_bundles) -> None:
    net = await network(n=2)
    await net.load(synthetic_bundles)
    holders, results = await collect(net.client(0), "111222333")
    assert holders.node_ids == [] and results == {}


async def test_invalid_identifier_refused_with_reason(network: NetworkFactory) -> None:
    net = await network(n=1)
    with pytest.raises(ClientError, match="11-check") as caught:
        await collect(net.client(0), "123456789")
    assert caught.value.exit_code == 2


async def test_dead_peer_is_unreachable_others_answer(
    network: NetworkFactory, synthetic_bundles
) -> None:
    net = await network(n=3)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    fhir_id = next(f for f in at_least(plan, 2) if any(i != 0 for i in plan.patients[f].nodes))
    dead = next(net.nodes[i] for i in plan.patients[fhir_id].nodes if i != 0)
    await dead.stop(0)

    _, results = await collect(net.client(0), bsn_of(plan, fhir_id), deadline_ms=2000)

    assert results[dead.config.node_id].status == "unreachable"
    assert results[dead.config.node_id].elapsed_ms < 2000, "unreachable must not wait the deadline"
    alive = [r for n, r in results.items() if n != dead.config.node_id]
    assert alive and all(r.status == "ok" for r in alive)


async def test_fetch_streams_document_and_checks_hash(
    network: NetworkFactory, synthetic_bundles
) -> None:
    net = await network(n=3)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    fhir_id = at_least(plan, 2)[0]
    bsn = bsn_of(plan, fhir_id)
    _, results = await collect(net.client(0), bsn)
    remote = next(r for r in results.values() if r.node_id != "node-1")
    listed = remote.documents[0]

    out = io.BytesIO()
    meta = await net.client(0).fetch(bsn, remote.node_id, listed.document_id, out)

    assert meta.document_id == listed.document_id
    assert len(out.getvalue()) == listed.size
    assert hashlib.sha256(out.getvalue()).hexdigest() == listed.sha256


async def test_fetch_refused_without_consent(network: NetworkFactory, synthetic_bundles) -> None:
    net = await network(n=2)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    fhir_id = at_least(plan, 1)[0]
    bsn = bsn_of(plan, fhir_id)
    _, results = await collect(net.client(0), bsn)
    holder_id, result = next(iter(results.items()))
    document_id = result.documents[0].document_id
    index = int(holder_id.removeprefix("node-")) - 1
    await net.deny_organisation(index, bsn, net.nodes[0].config.organisation_id)

    with pytest.raises(ClientError, match="consent"):
        await net.client(0).fetch(bsn, holder_id, document_id, io.BytesIO())


async def test_fetch_of_another_patients_document_is_not_found(
    network: NetworkFactory, synthetic_bundles
) -> None:
    net = await network(n=1)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    first, second = sorted(plan.patients)[:2]
    _, results = await collect(net.client(0), bsn_of(plan, first))
    document_id = results["node-1"].documents[0].document_id

    with pytest.raises(ClientError, match="no document"):
        await net.client(0).fetch(bsn_of(plan, second), "node-1", document_id, io.BytesIO())


async def test_fetch_of_an_oversized_document_id_is_refused_before_anyone_is_asked(
    network: NetworkFactory, synthetic_bundles
) -> None:
    net = await network(n=2)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    bsn = bsn_of(plan, at_least(plan, 2)[0])
    records = [(await node.audit.verify()).records for node in net.nodes]

    with pytest.raises(ClientError, match="1 to 256 characters") as caught:
        await net.client(0).fetch(bsn, "node-2", "x" * 3_000_000, io.BytesIO())

    assert caught.value.exit_code == 2
    assert [(await node.audit.verify()).records for node in net.nodes] == records


async def test_an_error_quoting_a_huge_input_is_cut_not_lost(
    network: NetworkFactory, synthetic_bundles
) -> None:
    """Error details travel in a header: quoting a 20,000-character facility id in full
    would exceed the header limit and reach the clinician as transport noise."""
    net = await network(n=1)
    with pytest.raises(ClientError, match=r"^facility 'n+ \.\.\. \(message cut\)$") as caught:
        await net.client(0).fetch("111222333", "n" * 20_000, "doc", io.BytesIO())
    assert len(str(caught.value)) < 1_100


async def test_search_without_a_valid_token_refused(network: NetworkFactory) -> None:
    net = await network(n=1)
    for token in ("", "tmu1_not-issued-here"):
        with pytest.raises(ClientError) as caught:
            await collect(net.client(0, token=token), "111222333")
        assert caught.value.exit_code == 4
        assert "token" in str(caught.value)


async def test_stale_index_entry_answers_no_record(
    network: NetworkFactory, synthetic_bundles
) -> None:
    """The registry lists node-2, but node-2 no longer has the patient."""
    net = await network(n=2)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    fhir_id = next(f for f in sorted(plan.patients) if plan.patients[f].nodes == [0])
    bsn = bsn_of(plan, fhir_id)
    pseudonym = net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn))
    await publish_as(net, node_tls(net.nodes[1].config), "node-2", pseudonym)

    _, results = await collect(net.client(0), bsn)

    assert results["node-2"].status == "no-record"
    assert results["node-2"].documents == []
    assert results["node-1"].status == "ok"


async def test_peer_that_never_answers_times_out(
    network: NetworkFactory, synthetic_bundles
) -> None:
    """A facility that accepts the call and hangs: timeout, the others answer."""
    net = await network(n=2)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    fhir_id = sorted(plan.patients)[0]
    bsn = bsn_of(plan, fhir_id)
    pseudonym = net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn))
    hung = await start_silent_peer(net, "FindDocuments", pseudonym)
    try:
        _, results = await collect(net.client(0), bsn, deadline_ms=300)
    finally:
        await hung.stop(0)

    assert results["hung"].status == "timeout"
    assert 250 <= results["hung"].elapsed_ms < 2000
    answered = [r for n, r in results.items() if n != "hung"]
    assert answered and all(r.status == "ok" for r in answered)


def test_a_holder_list_that_may_be_incomplete_says_so_to_people_and_programs() -> None:
    remembered = Holders(["node-2"], ["Ziekenhuis"], "c0ffee", "registry unreachable: ...")
    assert holders_line(remembered).startswith("Warning: registry unreachable")
    assert search_json("123", remembered, [])["incomplete"] == "registry unreachable: ..."
    complete = Holders(["node-2"], ["Ziekenhuis"], "c0ffee")
    assert not holders_line(complete).startswith("Warning")
    assert search_json("123", complete, [])["incomplete"] == ""


def test_an_ok_answer_with_a_warning_shows_it() -> None:
    """An answer from remembered holders (registry down) must say so on the facility line."""
    warned = FacilityResult(
        "node-2", "Ziekenhuis", "ok", 4, "registry unreachable: results may be incomplete", []
    )
    assert "may be incomplete" in facility_line(warned)
    assert "1 document" not in facility_line(warned) and "0 documents" in facility_line(warned)


async def test_no_patient_identifier_or_name_reaches_the_logs_at_info(
    network: NetworkFactory, synthetic_bundles, caplog: pytest.LogCaptureFixture
) -> None:
    """Search, report, fetch and a refusal, on every node: logs carry ids of documents,
    nodes and correlation, never whom they are about."""
    net = await network(n=3)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    fhir_id = at_least(plan, 2)[0]
    bsn = bsn_of(plan, fhir_id)
    holding = net.nodes[plan.patients[fhir_id].nodes[0]]
    patient = await holding.store.patient_by_identifier(canonical(BSN_SYSTEM, bsn))
    assert patient is not None and patient.family
    client = net.client(0)
    with caplog.at_level(logging.INFO):
        _, results = await collect(client, bsn)
        async for _ in client.report(bsn):
            pass
        node_id, result = next((n, r) for n, r in results.items() if r.documents)
        await client.fetch(bsn, node_id, result.documents[0].document_id, io.BytesIO())
        with pytest.raises(ClientError):
            await client.fetch(bsn, node_id, "DocumentReference/none", io.BytesIO())
    logged = caplog.text
    assert "search" in logged and "fetch" in logged  # the flows were logged at all
    for secret in (bsn, patient.family, *patient.given.split()):
        assert not re.search(rf"\b{re.escape(secret)}\b", logged), f"{secret!r} reached the logs"
