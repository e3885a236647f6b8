"""Consent rules at a fixed ``now``, the consent store, and the ``consent`` CLI on a tmp node.

The rules are pure (``node.consent.decide``/``locatable``), so each is one
small case here; the CLI runs as a subprocess, as an admin runs it.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from node.config import NodeConfig
from node.consent import (
    ALL_DATA,
    DATA_CATEGORIES,
    ConsentPolicy,
    ConsentRecord,
    applies_to,
    covering,
    decide,
    describe,
    in_force,
    is_consent_id,
    locatable,
    new_consent_id,
    span,
)
from node.consent_desk import ConsentDesk
from node.migrations import MIGRATIONS
from node.records import BundleDraft, PatientDraft
from node.store import NodeStore
from tools.admin_audit import os_user
from transmural import pki
from transmural.clock import SystemClock, utc_iso
from transmural.database import Database
from transmural.errors import InvalidInput, NotFound, Unavailable
from transmural.identifiers import BSN_SYSTEM, canonical
from transmural.pseudonym import new_network_key, write_network_key

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
OPT_IN = ConsentPolicy("opt-in", break_the_glass=False)
OPT_OUT = ConsentPolicy("opt-out", break_the_glass=False)
GLASS = ConsentPolicy("opt-in", break_the_glass=True)
ROOT = Path(__file__).resolve().parents[1]
BSN_A, BSN_B = "111222333", "123456782"


def consent(**fields: Any) -> ConsentRecord:
    """A permit of all data to everyone from 2025-01-01, with ``fields`` changed."""
    values: dict[str, Any] = {
        "consent_id": new_consent_id(), "patient_key": 1, "decision": "permit",
        "actor_kind": "all", "actor": "", "data": frozenset(), "period_start": "2025-01-01",
        "period_end": None, "recorded_by": "desk clerk", "recorded_via": "desk",
        "recorded_at": "2025-01-01T09:00:00+00:00",
    }  # fmt: skip
    values.update(fields)
    return ConsentRecord(**values)


def permit(**fields: Any) -> ConsentRecord:
    return consent(decision="permit", **fields)


def deny(**fields: Any) -> ConsentRecord:
    return consent(decision="deny", **fields)


def org(actor: str) -> dict[str, str]:
    return {"actor_kind": "organisation", "actor": actor}


def cat(actor: str) -> dict[str, str]:
    return {"actor_kind": "category", "actor": actor}


def ask(
    consents: list[ConsentRecord],
    policy: ConsentPolicy = OPT_IN,
    *,
    organisation: str = "URA-1",
    category: str = "hospital",
    purpose: str = "treatment",
    reason: str = "",
) -> Any:
    return decide(consents, organisation, category, purpose, reason, policy, NOW)


# --- the record ---


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"consent_id": "consent-1"}, "'c-' and 12"),
        ({"decision": "maybe"}, "decision must be one of"),
        ({"actor_kind": "all", "actor": "URA-1"}, "names no organisation"),
        ({"actor_kind": "category", "actor": "dentist"}, "organisation category"),
        ({"actor_kind": "organisation", "actor": ""}, "organisation id"),
        ({"actor_kind": "organisation", "actor": "URA 1"}, "organisation id"),
        ({"data": frozenset({"genome"})}, "unknown data categories genome"),
        ({"period_start": "15-06-2025"}, "period start"),
        ({"period_end": "2025-06-15T12:00:00"}, "with a zone"),
        ({"period_start": "2025-06-02", "period_end": "2025-06-01"}, "ends before it starts"),
        ({"status": "withdrawn"}, "withdrawal time"),
        ({"withdrawn_at": "2025-02-01"}, "withdrawal time"),
        ({"recorded_by": ""}, "recorded by"),
        ({"recorded_via": "fax"}, "recorded via"),
    ],
)
def test_an_invalid_record_is_refused_with_the_reason(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        consent(**fields)


def test_consent_ids_are_c_and_12_hex() -> None:
    ids = {new_consent_id() for _ in range(50)}
    assert len(ids) == 50 and all(is_consent_id(i) and len(i) == 14 for i in ids)


def test_our_organisation_categories_are_the_certificates() -> None:
    from node.consent import ORGANISATION_CATEGORIES

    assert tuple(pki.ORGANISATION_CATEGORIES) == ORGANISATION_CATEGORIES


def test_span_of_dates_and_datetimes() -> None:
    assert span("2024") == (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 12, 31, 23, 59, 59,
                            999999, tzinfo=UTC))  # fmt: skip
    assert span("2024-02")[1] == datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC)
    assert span("2024-02-03")[0] == datetime(2024, 2, 3, tzinfo=UTC)
    instant = datetime(2016, 6, 23, 7, 2, 33, tzinfo=UTC)
    assert span("2016-06-23T17:02:33+10:00") == (instant, instant)
    assert span("2016-06-23T07:02:33Z")[0] == instant
    assert span("2016-06-23T07:02:33.1234567Z")[0].microsecond == 123456
    for bad in ("2016-13-01", "2016-06-23T07:02:33", "2016-06-23T07:02Z", "yesterday"):
        with pytest.raises(ValueError):
            span(bad)


def test_describe_names_the_consent_for_the_audit_log() -> None:
    record = deny(consent_id="c-000000000123", **org("URA-2"))
    assert describe(record) == "consent c-000000000123: deny organisation URA-2 all data"
    record = permit(consent_id="c-000000000124", data=frozenset({"notes", "medication"}))
    assert describe(record) == "consent c-000000000124: permit all organisations medication, notes"


# --- which consents count ---


def test_a_consent_applies_only_inside_its_period_end_day_included() -> None:
    assert in_force(permit(period_start="2025-06-15"), NOW)
    assert not in_force(permit(period_start="2025-06-16"), NOW)
    assert in_force(permit(period_end="2025-06-15"), NOW)  # the whole last day
    assert not in_force(permit(period_end="2025-06-14"), NOW)
    assert not in_force(permit(period_end="2025-06-15T11:59:59Z"), NOW)
    assert in_force(
        permit(period_start="2025-06-15T12:00:00Z", period_end="2025-06-15T12:00:00Z"), NOW
    )
    assert in_force(permit(), NOW.timestamp())  # clock.now() works as well


def test_a_withdrawn_consent_does_not_apply() -> None:
    record = permit(status="withdrawn", withdrawn_at="2025-03-01T10:00:00+00:00")
    assert not in_force(record, NOW)
    assert not ask([record]).allowed


def test_whom_a_consent_applies_to() -> None:
    assert applies_to(permit(), "URA-1", "")
    assert applies_to(permit(**org("URA-1")), "URA-1", "gp")
    assert not applies_to(permit(**org("URA-1")), "URA-2", "gp")
    assert applies_to(permit(**cat("gp")), "URA-9", "gp")
    assert not applies_to(permit(**cat("gp")), "URA-9", "hospital")
    assert not applies_to(permit(**cat("gp")), "URA-9", "")  # unknown kind: no category consent


# --- decide: permit, deny, specificity ---


def test_no_consent_is_denied_under_opt_in() -> None:
    decision = ask([])
    assert not decision.allowed and not decision.break_the_glass
    assert decision.rule == "no applicable permit (opt-in)"


def test_opt_out_turns_the_default_around() -> None:
    decision = ask([], OPT_OUT)
    assert decision.allowed and decision.denied_categories == frozenset()
    assert decision.rule == "no applicable consent (opt-out)"


def test_an_applicable_permit_allows_everything() -> None:
    record = permit()
    decision = ask([record])
    assert decision.allowed and decision.denied_categories == frozenset()
    assert decision.rule == describe(record)


def test_a_permit_for_another_organisation_or_category_does_not_help() -> None:
    assert not ask([permit(**org("URA-2"))]).allowed
    assert not ask([permit(**cat("pharmacy"))]).allowed
    assert ask([permit(**cat("hospital"))]).allowed
    assert ask([permit(**org("URA-1"))]).allowed


@pytest.mark.parametrize("deny_whom", [org("URA-1"), cat("hospital")])
def test_a_specific_deny_beats_a_broader_permit(deny_whom: dict[str, str]) -> None:
    refusal = deny(**deny_whom)
    decision = ask([permit(), refusal])
    assert not decision.allowed
    assert decision.rule == describe(refusal)


def test_an_organisation_deny_beats_a_category_permit() -> None:
    assert not ask([permit(**cat("hospital")), deny(**org("URA-1"))]).allowed


def test_a_more_specific_permit_beats_a_broader_deny() -> None:
    assert ask([deny(), permit(**org("URA-1"))]).allowed
    assert ask([deny(**cat("hospital")), permit(**org("URA-1"))]).allowed
    assert not ask([deny(), permit(**org("URA-1"))], organisation="URA-2").allowed


def test_at_the_same_level_deny_wins() -> None:
    assert not ask([permit(), deny()]).allowed
    assert not ask([permit(**org("URA-1")), deny(**org("URA-1"))]).allowed
    # a deny of all data outranks a same-level permit of some (rule 1)
    assert not ask([deny(**org("URA-1")), permit(**org("URA-1"), data={"medication"})]).allowed


def test_a_deny_for_someone_else_does_not_apply() -> None:
    assert ask([permit(), deny(**org("URA-2")), deny(**cat("gp"))]).allowed


@pytest.mark.parametrize("period", [{"period_start": "2025-07-01"}, {"period_end": "2025-06-14"}])
def test_a_consent_outside_its_period_does_not_apply(period: dict[str, str]) -> None:
    assert not ask([permit(**period)]).allowed
    assert ask([permit(), deny(**org("URA-1"), **period)]).allowed


# --- decide: data categories ---


def test_a_category_deny_removes_exactly_those_documents() -> None:
    record = deny(data={"mental-health", "notes"})
    decision = ask([permit(), record])
    assert decision.allowed
    assert decision.denied_categories == {"mental-health", "notes"}
    assert not decision.shares("mental-health") and decision.shares("medication")
    assert describe(record) in decision.rule


def test_a_category_deny_yields_to_a_more_specific_permit() -> None:
    consents = [permit(), deny(data={"mental-health"}), permit(**org("URA-1"))]
    assert ask(consents).denied_categories == frozenset()
    assert ask(consents, organisation="URA-2").denied_categories == {"mental-health"}


def test_a_category_permit_under_opt_in_permits_only_those() -> None:
    decision = ask([permit(data={"medication", "allergies"})])
    assert decision.allowed
    assert decision.denied_categories == ALL_DATA - {"medication", "allergies"}
    assert "network default opt-in for" in decision.rule


def test_a_specific_permit_of_some_data_does_not_open_the_rest() -> None:
    # deny everyone everything, but hospital URA-1 may see medication
    decision = ask([deny(), permit(**org("URA-1"), data={"medication"})])
    assert decision.allowed
    assert decision.denied_categories == ALL_DATA - {"medication"}


def test_opt_out_with_a_deny() -> None:
    assert not ask([deny()], OPT_OUT).allowed
    assert not ask([deny(**org("URA-1"))], OPT_OUT).allowed
    assert ask([deny(**org("URA-1"))], OPT_OUT, organisation="URA-2").allowed
    partial = ask([deny(data={"mental-health"})], OPT_OUT)
    assert partial.allowed and partial.denied_categories == {"mental-health"}
    assert "network default opt-out for medication" in partial.rule


def test_a_denial_carries_nothing_to_leak() -> None:
    decision = ask([permit(), deny(**org("URA-1"))])
    assert not decision.allowed
    assert decision.denied_categories == ALL_DATA
    assert not any(decision.shares(c) for c in DATA_CATEGORIES)


# --- decide: break-the-glass ---


def test_break_the_glass_where_allowed_opens_everything_and_is_flagged() -> None:
    refusal = deny(**org("URA-1"))
    decision = ask([refusal], GLASS, purpose="emergency", reason="unconscious, no ID")
    assert decision.allowed and decision.break_the_glass
    assert decision.denied_categories == frozenset()
    assert decision.rule == f"break-the-glass (consent alone: {describe(refusal)})"
    partial = ask([permit(), deny(data={"mental-health"})], GLASS, purpose="emergency", reason="x")
    assert partial.break_the_glass and partial.denied_categories == frozenset()


def test_break_the_glass_is_flagged_even_when_consent_allows() -> None:
    decision = ask([permit()], GLASS, purpose="emergency", reason="collapse in the street")
    assert decision.allowed and decision.break_the_glass


def test_break_the_glass_where_the_network_forbids_it_gives_no_extra_rights() -> None:
    decision = ask([deny()], OPT_IN, purpose="emergency", reason="unconscious")
    assert not decision.allowed and not decision.break_the_glass
    assert "does not allow break-the-glass" in decision.rule
    allowed = ask([permit(), deny(data={"notes"})], OPT_IN, purpose="emergency", reason="x")
    assert not allowed.break_the_glass and allowed.denied_categories == {"notes"}


@pytest.mark.parametrize("reason", ["", "   "])
def test_emergency_without_a_reason_is_no_break_the_glass(reason: str) -> None:
    decision = ask([], GLASS, purpose="emergency", reason=reason)
    assert not decision.allowed and not decision.break_the_glass
    assert "without a reason" in decision.rule


def test_a_reason_without_the_emergency_purpose_is_no_break_the_glass() -> None:
    decision = ask([], GLASS, purpose="treatment", reason="I really need it")
    assert not decision.allowed and not decision.break_the_glass


# --- locatable ---


def test_locatable() -> None:
    assert not locatable([], OPT_IN, NOW)
    assert locatable([], OPT_OUT, NOW)
    for policy in (OPT_IN, OPT_OUT, GLASS):
        assert not locatable([deny()], policy, NOW)  # deny-all-for-all: not even to BTG
    assert locatable([permit(**org("URA-7"))], OPT_IN, NOW)
    assert locatable([permit(**cat("gp"), data={"medication"})], OPT_IN, NOW)
    assert locatable([deny(**org("URA-7"))], OPT_OUT, NOW)
    assert locatable([deny(), permit(**org("URA-7"))], OPT_IN, NOW)
    assert not locatable([permit(**org("URA-7")), deny(**org("URA-7"))], OPT_IN, NOW)
    assert not locatable([permit(period_end="2025-01-31")], OPT_IN, NOW)
    withdrawn = permit(status="withdrawn", withdrawn_at="2025-05-01")
    assert not locatable([withdrawn], OPT_IN, NOW)
    assert not locatable([deny(data=ALL_DATA)], OPT_OUT, NOW)
    assert locatable([deny(data=ALL_DATA - {"notes"})], OPT_OUT, NOW)


def test_a_consent_recorded_already_covers_the_same_one_again() -> None:
    first = permit(period_start="2025-01-01")
    assert covering(permit(period_start="2025-06-01"), [first]) == first
    assert covering(permit(period_start="2024-06-01"), [first]) is None  # starts earlier
    assert covering(permit(period_end="2030-01-01"), [first]) is None  # ends, the first never
    assert covering(consent(decision="deny"), [first]) is None
    assert covering(permit(data=frozenset({"lab-results"})), [first]) is None
    assert covering(permit(actor_kind="category", actor="gp"), [first]) is None
    withdrawn = permit(status="withdrawn", withdrawn_at="2025-02-01T00:00:00+00:00")
    assert covering(permit(period_start="2025-06-01"), [withdrawn]) is None


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(InvalidInput, match="opt-in or opt-out"):
        ConsentPolicy("sometimes")  # type: ignore[arg-type]


# --- the store ---


def patient_draft(fhir_id: str, bsn: str) -> PatientDraft:
    identifier = canonical(BSN_SYSTEM, bsn)
    return PatientDraft(
        fhir_id=fhir_id, identifier=identifier, pseudonym=None, family="Jansen", given="Els",
        birth_date="1950-01-01", gender="female",
        identifiers=((identifier.system, identifier.value),),
    )  # fmt: skip


async def add_patients(store: NodeStore, *bsns: str) -> list[int]:
    drafts = [patient_draft(f"p{i}", bsn) for i, bsn in enumerate(bsns)]
    await store.write_bundle(BundleDraft("test.json", drafts, [], [], [], pseudonymised=False))
    return [p.patient_key for p in await store.patients()]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[NodeStore]:
    opened = await NodeStore.open(tmp_path / "node.db")
    yield opened
    await opened.close()


async def test_store_keeps_a_consent_as_given(store: NodeStore, tmp_path: Path) -> None:
    key, other = await add_patients(store, BSN_A, BSN_B)
    first = deny(
        patient_key=key, data={"notes", "medication"}, period_end="2026-01-01", **cat("gp")
    )
    second = permit(patient_key=key, recorded_at="2025-02-01T00:00:00Z", recorded_via="portal")
    await store.add_consent(second)
    await store.add_consent(first)
    await store.add_consent(permit(patient_key=other))
    assert await store.consents_of(key) == [second, first]  # in the order recorded
    assert len(await store.all_consents()) == 3
    assert await store.consent(first.consent_id) == first
    with sqlite3.connect(tmp_path / "node.db") as raw:
        (data,) = raw.execute(
            "SELECT data FROM consents WHERE consent_id = ?", (first.consent_id,)
        ).fetchone()
    assert data == "medication notes"


async def test_store_refuses_unknown_patients_and_taken_ids_all_or_nothing(
    store: NodeStore,
) -> None:
    (key,) = await add_patients(store, BSN_A)
    with pytest.raises(NotFound):
        await store.add_consent(permit(patient_key=key + 1))
    taken = permit(patient_key=key)
    await store.add_consent(taken)
    with pytest.raises(InvalidInput, match="already recorded"):
        await store.add_consents([permit(patient_key=key), taken])
    assert await store.consents_of(key) == [taken]


async def test_withdrawn_consent_stays_and_applies_to_the_next_request(store: NodeStore) -> None:
    (key,) = await add_patients(store, BSN_A)
    record = permit(patient_key=key)
    await store.add_consent(record)
    assert ask(await store.consents_of(key)).allowed
    withdrawn = await store.withdraw_consent(record.consent_id, "2025-06-01T08:00:00+00:00")
    assert withdrawn == dataclasses.replace(
        record, status="withdrawn", withdrawn_at="2025-06-01T08:00:00+00:00"
    )
    assert await store.consents_of(key) == [withdrawn]
    assert not ask(await store.consents_of(key)).allowed
    with pytest.raises(InvalidInput, match="was withdrawn at"):
        await store.withdraw_consent(record.consent_id)
    with pytest.raises(NotFound):
        await store.withdraw_consent("c-000000000000")


async def test_upgrade_turns_the_yes_no_consent_into_a_permit(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = await Database.open(
        path, MIGRATIONS[:3], SystemClock(), owner="node", busy_timeout_ms=1000
    )
    async with old.transaction("seed") as db:
        for fhir_id, consent_given in (("yes", 1), ("no", 0)):
            await db.execute(
                "INSERT INTO patients (fhir_id, exchange_consent, updated_at) VALUES (?, ?, ?)",
                (fhir_id, consent_given, "2024-03-01T10:00:00+00:00"),
            )
    await old.close()
    store = await NodeStore.open(path)
    try:
        yes, no = [p.patient_key for p in await store.patients()]
        (record,) = await store.consents_of(yes)
        assert (record.decision, record.actor_kind, record.data) == ("permit", "all", frozenset())
        assert record.period_start == "2024-03-01T10:00:00+00:00"
        assert is_consent_id(record.consent_id)
        assert await store.consents_of(no) == []
    finally:
        await store.close()


async def test_a_consent_the_audit_log_cannot_record_is_not_stored(store: NodeStore) -> None:
    """Consent, its audit record and the patient's re-listing commit together or not at all."""
    (key,) = await add_patients(store, BSN_A)
    desk = ConsentDesk(store)
    kept = desk.blanket(key, True, "desk")
    await desk.record([kept])

    async def state() -> tuple[object, ...]:
        counts = [(await store.database.fetch(f"SELECT COUNT(*) FROM {t}"))[0][0]
                  for t in ("audit_log", "index_outbox")]  # fmt: skip
        return await store.consents_of(key), *counts

    before = await state()
    assert before[1] > 0  # the first consent was audited
    async with store.database.transaction("disk_full") as db:
        await db.execute(
            "CREATE TRIGGER full BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'full'); END"
        )
    with pytest.raises(Unavailable, match="the audit log cannot be written"):
        await desk.record([desk.blanket(key, False, "desk"), desk.blanket(key, True, "desk")])
    with pytest.raises(Unavailable, match="the audit log cannot be written"):
        await desk.withdraw(kept.consent_id, "desk")
    assert await state() == before


# --- the CLI, as a subprocess on a tmp node ---


def node_config(tmp_path: Path) -> Path:
    key = tmp_path / "network.key"
    write_network_key(key, new_network_key())
    config = NodeConfig(
        node_id="node-1", organisation_name="Test", organisation_id="URA-1",
        registry="127.0.0.1:1", database=tmp_path / "node.db", network_key_file=key,
        insecure_dev=True,
    )  # fmt: skip
    path = tmp_path / "node.toml"
    path.write_text(config.to_toml(tmp_path))
    return path


@pytest.fixture
async def node(tmp_path: Path) -> Path:
    config = node_config(tmp_path)
    store = await NodeStore.open(tmp_path / "node.db")
    try:
        await add_patients(store, BSN_A, BSN_B)
    finally:
        await store.close()
    return config


def admin(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.admin", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def listed(config: Path, bsn: str = BSN_A) -> list[dict[str, Any]]:
    done = admin("consent", "list", "--config", config, bsn, "--json")
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


async def test_cli_add_list_withdraw(node: Path) -> None:
    done = admin("consent", "add", "--config", node, BSN_A, "--deny", "--category", "pharmacy",
                 "--data", "mental-health", "notes", "--from", "2025-01-01", "--until",
                 "2030-12-31", "--recorded-by", "J. de Vries", "--via", "portal")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "deny category pharmacy mental-health, notes" in done.stdout
    done = admin("consent", "add", "--config", node, BSN_A, "--permit", "--organisation",
                 "URA-2", "--recorded-by", "desk")  # fmt: skip
    assert done.returncode == 0, done.stderr
    # This node's registry (127.0.0.1:1) is down: recorded, saying it was not checked.
    assert "'URA-2' not checked against the network's members" in done.stderr
    first, second = listed(node)
    assert first == {
        "consent_id": first["consent_id"], "decision": "deny", "actor_kind": "category",
        "actor": "pharmacy", "data": ["mental-health", "notes"], "period_start": "2025-01-01",
        "period_end": "2030-12-31", "recorded_by": "J. de Vries", "recorded_via": "portal",
        "recorded_at": first["recorded_at"], "status": "active", "withdrawn_at": None,
    }  # fmt: skip
    assert (second["actor_kind"], second["actor"], second["data"]) == ("organisation", "URA-2", [])
    assert second["period_start"] == second["recorded_at"]  # from now
    assert listed(node, BSN_B) == []
    twice = admin("consent", "add", "--config", node, BSN_A, "--deny", "--category", "pharmacy",
                  "--data", "notes", "mental-health", "--from", "2025-06-01", "--until",
                  "2030-12-31", "--recorded-by", "desk")  # fmt: skip
    assert twice.returncode == 2 and f"{first['consent_id']}: deny" in twice.stderr
    assert "is recorded already: nothing was added" in twice.stderr and len(listed(node)) == 2

    table = admin("consent", "list", "--config", node, BSN_A)
    assert table.returncode == 0 and first["consent_id"] in table.stdout
    assert "organisation URA-2" in table.stdout

    done = admin("consent", "withdraw", "--config", node, second["consent_id"])
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in listed(node)] == ["active", "withdrawn"]
    again = admin("consent", "withdraw", "--config", node, second["consent_id"])
    assert again.returncode == 2 and "was withdrawn at" in again.stderr


async def test_cli_refusals(node: Path) -> None:
    unknown = admin("consent", "add", "--config", node, "999999990",
                    "--permit", "--recorded-by", "desk")  # fmt: skip
    assert unknown.returncode == 1
    assert "no patient with that identifier" in unknown.stderr
    missing = admin("consent", "withdraw", "--config", node, "c-000000000000")
    assert missing.returncode == 1 and "no consent c-000000000000" in missing.stderr
    bad_date = admin("consent", "add", "--config", node, BSN_A, "--permit", "--until",
                     "31-12-2030", "--recorded-by", "desk")  # fmt: skip
    assert bad_date.returncode == 2 and bad_date.stderr.count("\n") == 1
    assert "'31-12-2030' is not a date" in bad_date.stderr
    backwards = admin("consent", "add", "--config", node, BSN_A, "--permit", "--from",
                      "2030-01-01", "--until", "2029-01-01", "--recorded-by", "desk")  # fmt: skip
    assert backwards.returncode == 2
    assert "--until 2029-01-01 is before the consent starts (2030-01-01)" in backwards.stderr
    both = admin("consent", "add", "--config", node, BSN_A, "--permit", "--deny",
                 "--recorded-by", "desk")  # fmt: skip
    assert both.returncode == 2
    assert listed(node) == []
    alone = admin("consent", "add", "--config", node, BSN_A, "--permit", "--not-yet-joined",
                  "--recorded-by", "desk")  # fmt: skip
    assert alone.returncode == 2 and "--not-yet-joined goes with --organisation" in alone.stderr
    blank = admin("consent", "add", "--config", node, BSN_A, "--deny", "--organisation", "",
                  "--recorded-by", "desk")  # fmt: skip
    assert blank.returncode == 2 and "organisation id must be" in blank.stderr
    assert "not checked against" not in blank.stderr  # spelling first, the registry after
    past = admin("consent", "add", "--config", node, BSN_A, "--permit", "--from", "2020-01-01",
                 "--until", "2021-01-01", "--recorded-by", "desk")  # fmt: skip
    assert past.returncode == 2 and "--until 2021-01-01 is over" in past.stderr
    a_minute_ago = utc_iso(SystemClock().now() - 60)
    just_past = admin("consent", "add", "--config", node, BSN_A, "--deny", "--until",
                      a_minute_ago, "--recorded-by", "desk")  # fmt: skip
    assert just_past.returncode == 2 and f"--until {a_minute_ago} is over" in just_past.stderr
    assert "consent c-" not in just_past.stderr  # no id of a consent never recorded
    for hidden in ("desk\u202e", "de\u200bsk", "desk\x9b"):  # reads as "desk", is not
        sneaky = admin("consent", "add", "--config", node, BSN_A, "--permit",
                       "--recorded-by", hidden)  # fmt: skip
        assert sneaky.returncode == 2 and "printable characters" in sneaky.stderr
    assert listed(node) == []


async def test_cli_withdraw_names_who_and_the_operator_is_audited(node: Path) -> None:
    done = admin("consent", "add", "--config", node, BSN_A, "--permit", "--recorded-by", "desk")
    assert done.returncode == 0, done.stderr
    (consent,) = listed(node)
    nameless = admin("consent", "withdraw", "--config", node, consent["consent_id"],
                     "--recorded-by", "")  # fmt: skip
    assert nameless.returncode == 2 and "recorded by must be" in nameless.stderr
    assert [r["status"] for r in listed(node)] == ["active"]
    done = admin("consent", "withdraw", "--config", node, consent["consent_id"],
                 "--recorded-by", "J. de Vries")  # fmt: skip
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(node.parent / "node.db") as db:
        rows = db.execute(
            "SELECT action, clinician_id, outcome_reason FROM audit_log"
            " WHERE action IN ('consent-add', 'consent-withdraw') ORDER BY seq"
        ).fetchall()
    operator = os_user()  # who ran the command, beside the name typed for the record
    assert [(a, who) for a, who, _ in rows] == [
        ("consent-add", operator),
        ("consent-withdraw", operator),
    ]
    assert rows[0][2].endswith("; recorded by desk")
    assert rows[1][2].endswith("; withdrawn by J. de Vries")


def test_cli_refuses_a_config_whose_database_is_missing(tmp_path: Path) -> None:
    config = node_config(tmp_path)  # no node.db next to it
    for args in (["consent", "list", "--config", config, BSN_A],
                 ["audit", "export", "--config", config, "--patient", BSN_A],
                 ["user", "list", "--config", config]):  # fmt: skip
        refused = admin(*args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert f"no node database at {tmp_path / 'node.db'}" in refused.stderr
    assert not (tmp_path / "node.db").exists()
    (tmp_path / "node.db").touch()  # an empty file: SQLite would take it as a new database
    refused = admin("consent", "list", "--config", config, BSN_A)
    assert refused.returncode == 2 and "no node database at" in refused.stderr
    assert (tmp_path / "node.db").stat().st_size == 0


def test_decide_for_reads_the_requester() -> None:
    from node.answers import Requester
    from node.consent import decide_for

    requester = Requester(
        clinician_id="dr", display_name="Dr", role="physician", organisation_id="URA-1",
        purpose_of_use="emergency", reason="unconscious", organisation_category="gp",
    )  # fmt: skip
    assert decide_for([deny(**cat("gp"))], requester, GLASS, NOW).break_the_glass
    assert not decide_for([deny(**cat("gp"))], requester, OPT_IN, NOW).allowed


async def test_cli_reading_a_patients_consents_is_in_their_access_history(node: Path) -> None:
    assert admin("consent", "list", "--config", node, BSN_A).returncode == 0
    assert admin("consent", "export", "--config", node, BSN_A).returncode == 0
    history = admin("audit", "export", "--config", node, "--patient", BSN_A, "--json")
    assert history.returncode == 0, history.stderr
    reads = [r for r in json.loads(history.stdout)["records"] if r["action"] == "consent-read"]
    assert [(r["clinician_id"], r["outcome_reason"]) for r in reads] == [
        (os_user(), "consents listed with transmural-admin"),
        (os_user(), "consents exported as FHIR with transmural-admin"),
    ]
    other = admin("audit", "export", "--config", node, "--patient", BSN_B, "--json")
    assert not [r for r in json.loads(other.stdout)["records"] if r["action"] == "consent-read"]
