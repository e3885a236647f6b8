"""Consent decided by the data holder, and the audit on both sides (issue 4), over real gRPC.

node-1's physician asks; the patient's consents live at the holders.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from node.consent import ConsentRecord
from node.consent_desk import ConsentDesk
from node.records import IndexChange
from node.registry_link import RegistryLink
from tests.conftest import NetworkFactory, RunningNetwork, collect, node_tls
from tests.test_consent import BSN_A, add_patients, admin, listed
from tests.test_search import bsn_of
from tools.bootstrap import write_node_config
from tools.gateway_client import ClientError
from transmural.errors import InvalidInput, Unavailable
from transmural.identifiers import BSN_SYSTEM, canonical


async def two_facility_patient(net: RunningNetwork, bundles: Path) -> tuple[str, int]:
    """A patient held at node-2 (and maybe elsewhere): (bsn, node-2's patient key)."""
    plan = await net.load(bundles)
    fhir_id = next(f for f in sorted(plan.patients) if 1 in plan.patients[f].nodes)
    bsn = bsn_of(plan, fhir_id)
    patient = await net.nodes[1].store.patient_by_identifier(canonical(BSN_SYSTEM, bsn))
    assert patient is not None
    return bsn, patient.patient_key


def consent(desk: ConsentDesk, key: int, permit: bool, **changes: object) -> ConsentRecord:
    return dataclasses.replace(desk.blanket(key, permit, "test desk"), **changes)  # type: ignore[arg-type]


async def record(net: RunningNetwork, *consents: ConsentRecord) -> None:
    await ConsentDesk(net.nodes[1].store).record(list(consents))
    await net.published()


async def node2_answer(net: RunningNetwork, bsn: str, **search: object) -> str:
    _, results = await collect(net.client(0), bsn, **search)  # type: ignore[arg-type]
    return results["node-2"].status if "node-2" in results else "not-listed"


async def listed_at_node2(net: RunningNetwork, bsn: str) -> bool:
    link = RegistryLink(net.registry.address, node_tls(net.nodes[0].config))
    try:
        holders = await link.locate(net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn)))
    finally:
        await link.close()
    return "node-2" in {h.node_id for h in holders}


@pytest.fixture
async def net(network: NetworkFactory) -> RunningNetwork:
    return await network(n=2)


async def test_no_applicable_permit_is_denied_and_opt_in_lists_nobody(
    net: RunningNetwork, synthetic_bundles: Path
) -> None:
    bsn, key = await two_facility_patient(net, synthetic_bundles)
    assert not await listed_at_node2(net, bsn), "opt-in: no consent, no listing"
    desk = ConsentDesk(net.nodes[1].store)
    # A permit for another organisation only: node-2 lists the patient, but not for node-1.
    await record(net, consent(desk, key, True, actor_kind="organisation", actor="URA-12345678"))
    assert await listed_at_node2(net, bsn)
    assert await node2_answer(net, bsn) == "consent-denied"


async def test_opt_out_network_answers_without_consent(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net = await network(n=2, consent_default="opt-out")
    bsn, _ = await two_facility_patient(net, synthetic_bundles)
    assert await node2_answer(net, bsn) == "ok"


async def test_specific_deny_beats_broader_permit(
    net: RunningNetwork, synthetic_bundles: Path
) -> None:
    bsn, key = await two_facility_patient(net, synthetic_bundles)
    desk = ConsentDesk(net.nodes[1].store)
    asker = net.nodes[0].config.organisation_id
    await record(net, consent(desk, key, True))
    assert await node2_answer(net, bsn) == "ok"
    await record(net, consent(desk, key, False, actor_kind="organisation", actor=asker))
    assert await node2_answer(net, bsn) == "consent-denied"


async def test_consent_outside_its_period_does_not_apply(
    net: RunningNetwork, synthetic_bundles: Path
) -> None:
    bsn, key = await two_facility_patient(net, synthetic_bundles)
    desk = ConsentDesk(net.nodes[1].store)
    asker = net.nodes[0].config.organisation_id
    expired_deny = consent(
        desk, key, False, actor_kind="organisation", actor=asker,
        period_start="2020-01-01", period_end="2021-01-01",
    )  # fmt: skip
    future_deny = consent(
        desk, key, False, actor_kind="organisation", actor=asker, period_start="2999-01-01"
    )
    await record(net, consent(desk, key, True), expired_deny, future_deny)
    assert await node2_answer(net, bsn) == "ok"


async def test_category_deny_removes_exactly_those_documents(
    net: RunningNetwork, synthetic_bundles: Path
) -> None:
    bsn, key = await two_facility_patient(net, synthetic_bundles)
    desk = ConsentDesk(net.nodes[1].store)
    await record(net, consent(desk, key, True))
    held = await net.nodes[1].store.documents_of(key)
    category = next(c for d in held for c in sorted(d.categories) if c != "notes")
    expected = {d.document_id for d in held if category not in d.categories}
    assert expected != {d.document_id for d in held}, "the category must hide some document"

    await record(net, consent(desk, key, False, data=frozenset({category})))
    _, results = await collect(net.client(0), bsn)

    assert results["node-2"].status == "ok"
    assert {d.document_id for d in results["node-2"].documents} == expected
    hidden = next(d for d in held if category in d.categories)
    with pytest.raises(ClientError, match="consent"):
        await net.client(0).fetch(bsn, "node-2", hidden.document_id, io.BytesIO())


async def test_withdrawn_consent_applies_to_the_next_request_and_unlists(
    net: RunningNetwork, synthetic_bundles: Path
) -> None:
    bsn, key = await two_facility_patient(net, synthetic_bundles)
    desk = ConsentDesk(net.nodes[1].store)
    permit = consent(desk, key, True)
    await record(net, permit)
    assert await node2_answer(net, bsn) == "ok"
    await desk.withdraw(permit.consent_id, "test desk")
    # The very next request, before the index has caught up, is refused...
    pseudonym = net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn))
    assert await node2_answer(net, bsn) in ("consent-denied", "not-listed")
    # ...and the registry stops listing node-2 once it publishes.
    await net.published()
    assert not await listed_at_node2(net, bsn)
    assert not any(
        c.pseudonym == pseudonym for c in await net.nodes[1].store.pending_index_changes(100)
    )


@pytest.mark.parametrize("allowed_by_network", [True, False])
async def test_break_the_glass_only_where_the_network_allows_and_always_flagged(
    network: NetworkFactory, synthetic_bundles: Path, allowed_by_network: bool
) -> None:
    net = await network(n=2, break_the_glass=allowed_by_network)
    bsn, key = await two_facility_patient(net, synthetic_bundles)
    desk = ConsentDesk(net.nodes[1].store)
    asker = net.nodes[0].config.organisation_id
    await record(
        net, consent(desk, key, True),
        consent(desk, key, False, actor_kind="organisation", actor=asker),
    )  # fmt: skip
    reason = "unconscious in the emergency department"
    answer = await node2_answer(net, bsn, purpose="emergency", reason=reason)
    assert answer == ("ok" if allowed_by_network else "consent-denied")
    records = await net.nodes[1].audit.export(key, "")
    flagged = [r for r in records if r.break_the_glass]
    if allowed_by_network:
        assert flagged and flagged[-1].break_the_glass_reason == reason
        assert flagged[-1].action == "break-the-glass"
    else:
        assert not flagged


async def test_audit_on_both_sides_shares_the_correlation_id(
    net: RunningNetwork, synthetic_bundles: Path
) -> None:
    bsn, key = await two_facility_patient(net, synthetic_bundles)
    await record(net, consent(ConsentDesk(net.nodes[1].store), key, True))
    holders, results = await collect(net.client(0), bsn)
    document = results["node-2"].documents[0]
    await net.client(0).fetch(bsn, "node-2", document.document_id, io.BytesIO())

    pseudonym = net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn)).hex()
    asking = await net.nodes[0].audit.export(None, pseudonym)
    answering = await net.nodes[1].audit.export(key, pseudonym)
    searched = [r for r in answering if r.action == "search"]
    assert searched and searched[-1].correlation_id == holders.correlation_id
    assert searched[-1].outcome == "granted" and searched[-1].requesting_node == "node-1"
    assert any(r.correlation_id == holders.correlation_id for r in asking if r.side == "asking")
    fetched = [r for r in answering if r.action == "fetch"]
    assert fetched and fetched[-1].document_ids == [document.document_id]
    assert any(r.action == "fetch" and r.side == "asking" for r in asking)
    for node in net.nodes:
        report = await node.audit.verify()
        assert report.ok, report.first_problem


async def test_export_holds_every_access_to_the_patient_and_no_other(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net = await network(n=2, consent_default="opt-out")
    plan = await net.load(synthetic_bundles)
    at_node2 = [f for f in sorted(plan.patients) if 1 in plan.patients[f].nodes][:2]
    first, second = (bsn_of(plan, f) for f in at_node2)
    for bsn in (first, second, first):
        await collect(net.client(0), bsn)
    patient = await net.nodes[1].store.patient_by_identifier(canonical(BSN_SYSTEM, first))
    assert patient is not None
    pseudonym = net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, first)).hex()

    exported = await net.nodes[1].audit.export(patient.patient_key, pseudonym)

    searches = [r for r in exported if r.action == "search"]
    assert len(searches) == 2
    assert all(r.pseudonym in ("", pseudonym) for r in exported)
    assert all(r.patient_key in (None, patient.patient_key) for r in exported)


async def test_stale_listing_is_withdrawn_when_consent_says_so(
    net: RunningNetwork, synthetic_bundles: Path
) -> None:
    """Whatever queued a pseudonym, the publisher lists it only if consent allows."""
    bsn, _ = await two_facility_patient(net, synthetic_bundles)
    pseudonym = net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn))
    resolved = await net.nodes[1].publisher._listing.resolve(  # type: ignore[union-attr]
        [IndexChange(1, pseudonym, False)]
    )
    assert resolved[0].withdrawn, "no consent under opt-in: the entry must be withdrawn"


async def test_no_access_without_its_audit_record(
    net: RunningNetwork, synthetic_bundles: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """node-2 cannot write its audit log: it refuses, and says so; nothing leaks."""
    bsn, key = await two_facility_patient(net, synthetic_bundles)
    await record(net, consent(ConsentDesk(net.nodes[1].store), key, True))
    before = (await net.nodes[1].audit.verify()).records
    audit = net.nodes[1].audit

    async def disk_full(record: object) -> object:
        raise Unavailable("the audit log cannot be written: database or disk is full")

    monkeypatch.setattr(audit, "append", disk_full)
    _, results = await collect(net.client(0), bsn)

    answer = results["node-2"]
    assert answer.status == "error" and answer.documents == []
    assert "audit log cannot be written" in answer.message
    monkeypatch.undo()
    report = await net.nodes[1].audit.verify()
    assert report.ok and report.records == before


async def test_listing_follows_a_consent_that_ends_by_itself(
    net: RunningNetwork, synthetic_bundles: Path
) -> None:
    """No one touches the patient: the time-bound sweep takes the listing out."""
    bsn, key = await two_facility_patient(net, synthetic_bundles)
    desk = ConsentDesk(net.nodes[1].store)
    ends = datetime.now(UTC) + timedelta(seconds=2)
    await record(net, consent(desk, key, True, period_end=ends.isoformat(timespec="seconds")))
    assert await listed_at_node2(net, bsn)
    await asyncio.sleep(max(0.0, (ends - datetime.now(UTC)).total_seconds()) + 1.1)
    assert await net.nodes[1].store.request_time_bound_checks() >= 1
    await net.published()
    assert not await listed_at_node2(net, bsn)


async def test_a_flood_of_consents_is_refused(net: RunningNetwork, synthetic_bundles: Path) -> None:
    _, key = await two_facility_patient(net, synthetic_bundles)
    desk = ConsentDesk(net.nodes[1].store)
    flood = [consent(desk, key, True, consent_id=f"c-{i:012x}") for i in range(51)]
    with pytest.raises(InvalidInput, match="at most 50 active consents"):
        await desk.record(flood)
    assert await net.nodes[1].store.consents_of(key) == []  # all or nothing


async def test_an_organisation_no_member_has_is_refused_unless_said_so(
    network: NetworkFactory,
) -> None:
    """A mistyped URA in a deny would match no one: the admin is told before it is recorded."""
    net = await network(n=2)
    node = net.nodes[0]
    await add_patients(node.store, BSN_A)
    config = write_node_config(node.config.database.parent, node.config)

    async def add(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(admin, "consent", "add", "--config", config, BSN_A,
                                       "--deny", "--recorded-by", "desk", *args)  # fmt: skip

    typo = await add("--organisation", "URA-9000002")
    assert typo.returncode == 2, typo.stderr
    assert "no member of the network has organisation id 'URA-9000002'" in typo.stderr
    assert "(members: URA-90000001, URA-90000002)" in typo.stderr
    assert listed(config) == []  # nothing recorded
    assert (await add("--organisation", "URA-90000002")).returncode == 0
    assert (await add("--organisation", "URA-9000002", "--not-yet-joined")).returncode == 0
    assert [r["actor"] for r in listed(config)] == ["URA-90000002", "URA-9000002"]

    # An import naming that organisation is held to the same check (here: our own export).
    exported = config.parent / "consents.json"
    done = await asyncio.to_thread(admin, "consent", "export", "--config", config, BSN_A)
    exported.write_text(done.stdout)
    imported = await asyncio.to_thread(admin, "consent", "import", "--config", config, BSN_A,
                                       exported)  # fmt: skip
    assert imported.returncode == 2 and "organisation id 'URA-9000002'" in imported.stderr
    past_the_check = await asyncio.to_thread(admin, "consent", "import", "--config", config,
                                             BSN_A, exported, "--not-yet-joined")  # fmt: skip
    assert past_the_check.returncode == 2 and "already recorded" in past_the_check.stderr
