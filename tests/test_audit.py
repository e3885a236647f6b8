"""The audit log (flow 7): append-only, hash-chained, verifiable, exportable per patient.

Tampering is simulated as an attacker with the file would do it: plain
sqlite3, dropping the append-only triggers first. ``verify`` must name the
first record that was changed, removed or moved.

What the chain alone cannot show: records cut off its *end*. A truncated
log is a consistent prefix, and verifies. Catching that needs the last hash
(or count) kept elsewhere; ``test_a_truncated_tail_is_not_detectable_by_the_chain``
pins the limit down so nobody believes otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from node import audit as audit_module
from node.audit import GENESIS, AuditLog, AuditRecord, chain_hash
from node.config import NodeConfig
from node.ingest import ingest_folder
from node.migrations import MIGRATIONS
from node.store import NodeStore
from tools import admin
from tools.synthetic import generate
from transmural.database import Database
from transmural.errors import Unavailable
from transmural.pseudonym import Pseudonymiser, new_network_key, write_network_key

REPO = Path(__file__).resolve().parents[1]
ADMIN = [sys.executable, "-m", "tools.admin"]
PSEUDONYM_A = "aa" * 32
PSEUDONYM_B = "bb" * 32


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.25) -> None:
        self.now_s = now

    def now(self) -> float:
        return self.now_s

    def monotonic(self) -> float:
        return self.now_s


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[NodeStore]:
    store = await NodeStore.open(tmp_path / "node.db", FakeClock())
    yield store
    await store.close()


@pytest.fixture
def log(store: NodeStore) -> AuditLog:
    return AuditLog(store.database, FakeClock())


def search(patient_key: int | None = 1, pseudonym: str = PSEUDONYM_A, **more: Any) -> AuditRecord:
    """An answering node's record of a granted search."""
    fields: dict[str, Any] = {
        "action": "search", "outcome": "granted", "side": "answering",
        "patient_key": patient_key, "pseudonym": pseudonym, "document_ids": ["doc-1", "doc-2"],
        "clinician_id": "dr.jansen", "role": "physician", "organisation_id": "ura:1",
        "on_behalf_of": "dr.de.vries", "requesting_node": "node-2",
        "requesting_address": "127.0.0.1:5001", "purpose_of_use": "treatment",
        "consent_rule": "permit-all", "correlation_id": "c0ffee",
    }  # fmt: skip
    fields.update(more)
    return AuditRecord(**fields)


async def fill(log: AuditLog, count: int) -> list[AuditRecord]:
    return [await log.append(search(patient_key=n % 3)) for n in range(count)]


def tamper(path: Path, *statements: str | tuple[str, tuple[Any, ...]]) -> None:
    """Run SQL on the file as an attacker would: no append-only triggers, no CHECKs."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA ignore_check_constraints = ON")
        db.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        db.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
        for statement in statements:
            sql, params = (statement, ()) if isinstance(statement, str) else statement
            db.execute(sql, params)
        db.commit()
    finally:
        db.close()


# --- append and verify ---


async def test_append_chains_each_record_to_the_one_before(tmp_path: Path, log: AuditLog) -> None:
    written = await fill(log, 5)

    assert [r.seq for r in written] == [1, 2, 3, 4, 5]
    assert written[0].time == "2023-11-14T22:13:20.250+00:00"
    assert len({r.event_id for r in written}) == 5
    assert all(len(r.event_id) == 32 for r in written)
    db = sqlite3.connect(tmp_path / "node.db")
    rows = db.execute("SELECT prev_hash, hash FROM audit_log ORDER BY seq").fetchall()
    db.close()
    assert rows[0][0] == GENESIS
    for (prev, hash_), record, before in zip(rows, written, [(None, GENESIS), *rows], strict=False):
        assert prev == before[1]
        assert hash_ == chain_hash(prev, record)
    assert await log.verify() == audit_module.VerifyReport(True, 5, None)


async def test_an_empty_log_verifies(log: AuditLog) -> None:
    assert await log.verify() == audit_module.VerifyReport(True, 0, None)


async def test_every_field_round_trips(log: AuditLog) -> None:
    record = search(
        break_the_glass=True, break_the_glass_reason="unconscious, ER", event_id="e" * 32
    )
    stored = await log.append(record)

    (exported,) = await log.export(1, "")
    assert exported == stored
    assert stored.event_id == "e" * 32 and stored.break_the_glass


@pytest.mark.parametrize(
    "bad",
    [
        {"action": "Search!"},
        {"outcome": "maybe"},
        {"side": "sideways"},
        {"pseudonym": "not hex"},
    ],
)
async def test_a_malformed_record_is_refused_before_writing(
    log: AuditLog, bad: dict[str, str]
) -> None:
    fields = {"action": "search", "outcome": "granted", "side": "local", **bad}
    with pytest.raises(ValueError):
        await log.append(AuditRecord(**fields))  # type: ignore[arg-type]
    assert await log.verify() == audit_module.VerifyReport(True, 0, None)


async def test_triggers_refuse_update_and_delete(tmp_path: Path, log: AuditLog) -> None:
    await fill(log, 2)
    db = sqlite3.connect(tmp_path / "node.db")
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE audit_log SET role = 'nurse' WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM audit_log WHERE seq = 2")
    finally:
        db.close()
    assert (await log.verify()).ok


# --- tampering ---


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("role", "'nurse'"),
        ("outcome", "'denied'"),
        ("time", "'2023-11-14T22:13:21.250+00:00'"),
        ("patient_key", "99"),
        ("document_ids", "'[\"doc-1\"]'"),
        ("document_ids", '\'["doc-1", "doc-2"]\''),  # same list, other spelling
        ("break_the_glass", "1"),
        ("break_the_glass", "2"),
        ("time", "X'00ff'"),  # a blob where text belongs
        ("role", "7"),
        ("hash", "zeroblob(32)"),
    ],
)
async def test_a_changed_field_is_found_at_its_seq(
    tmp_path: Path, log: AuditLog, column: str, value: str
) -> None:
    await fill(log, 8)
    tamper(tmp_path / "node.db", f"UPDATE audit_log SET {column} = {value} WHERE seq = 5")

    report = await log.verify()

    assert not report.ok and report.records == 4
    assert report.first_problem is not None and report.first_problem.startswith("seq 5:")
    assert "changed" in report.first_problem


async def test_a_changed_record_with_its_hash_recomputed_breaks_the_next_link(
    tmp_path: Path, log: AuditLog
) -> None:
    """The attacker rehashes the record they changed: the next record still points at the old."""
    written = await fill(log, 6)
    changed = audit_module.dataclasses.replace(written[2], role="nurse")
    db = sqlite3.connect(tmp_path / "node.db")
    (prev,) = db.execute("SELECT prev_hash FROM audit_log WHERE seq = 3").fetchone()
    db.close()
    new_hash = chain_hash(prev, changed).hex()
    tamper(
        tmp_path / "node.db",
        f"UPDATE audit_log SET role = 'nurse', hash = x'{new_hash}' WHERE seq = 3",
    )

    report = await log.verify()

    assert report.first_problem == (
        "seq 4: prev_hash does not match the hash of seq 3 "
        "(a record was deleted, replaced or moved)"
    )


@pytest.mark.parametrize(("deleted", "found_at"), [(5, 6), (1, 2), (3, 6)])
async def test_a_deleted_record_is_named(
    tmp_path: Path, log: AuditLog, deleted: int, found_at: int
) -> None:
    await fill(log, 8)
    gone = f"seq BETWEEN {deleted} AND {found_at - 1}"
    tamper(tmp_path / "node.db", f"DELETE FROM audit_log WHERE {gone}")

    report = await log.verify()

    missing = f"seq {deleted}" if found_at == deleted + 1 else f"seq {deleted}-{found_at - 1}"
    assert report.first_problem == (
        f"seq {found_at}: record {missing} is missing (deleted); the chain resumes here"
    )
    assert report.records == deleted - 1


async def test_a_deleted_record_with_the_rest_renumbered_is_found(
    tmp_path: Path, log: AuditLog
) -> None:
    await fill(log, 8)
    tamper(
        tmp_path / "node.db",
        "DELETE FROM audit_log WHERE seq = 5",
        "UPDATE audit_log SET seq = seq - 1 WHERE seq > 5",
    )

    report = await log.verify()

    assert report.first_problem is not None and report.first_problem.startswith("seq 5: prev_hash")


def swap(path: Path, a: int, b: int, columns: list[str]) -> None:
    """Exchange two records' contents (not their seq): the rows appear reordered."""
    db = sqlite3.connect(path)
    names = ", ".join(columns)
    row_a = db.execute(f"SELECT {names} FROM audit_log WHERE seq = ?", (a,)).fetchone()
    row_b = db.execute(f"SELECT {names} FROM audit_log WHERE seq = ?", (b,)).fetchone()
    db.close()
    assignments = ", ".join(f"{c} = ?" for c in columns)
    update = f"UPDATE audit_log SET {assignments} WHERE seq = ?"
    tamper(
        path,
        (f"UPDATE audit_log SET event_id = 'moving' WHERE seq = {a}", ()),
        (update, (*row_a, b)),
        (update, (*row_b, a)),
    )


@pytest.mark.parametrize("with_hashes", [True, False])
async def test_two_swapped_records_are_found_at_the_first(
    tmp_path: Path, log: AuditLog, with_hashes: bool
) -> None:
    await fill(log, 9)
    columns = [c for c in audit_module._COLUMNS if c != "seq"]
    swap(tmp_path / "node.db", 3, 7, columns + (["prev_hash", "hash"] if with_hashes else []))

    report = await log.verify()

    assert not report.ok and report.records == 2
    assert report.first_problem is not None and report.first_problem.startswith("seq 3:")


async def test_a_replaced_genesis_is_found(tmp_path: Path, log: AuditLog) -> None:
    await fill(log, 3)
    tamper(tmp_path / "node.db", "UPDATE audit_log SET prev_hash = randomblob(32) WHERE seq = 1")

    report = await log.verify()

    assert report.first_problem is not None and "seq 1: prev_hash is not the genesis" in (
        report.first_problem
    )


async def test_a_truncated_tail_is_not_detectable_by_the_chain(
    tmp_path: Path, log: AuditLog
) -> None:
    """The limit of a hash chain: a consistent prefix verifies (see module doc)."""
    await fill(log, 8)
    tamper(tmp_path / "node.db", "DELETE FROM audit_log WHERE seq > 5")

    assert await log.verify() == audit_module.VerifyReport(True, 5, None)


async def test_verify_reads_in_batches_and_carries_the_chain_across(
    tmp_path: Path, log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "VERIFY_BATCH", 4)
    await fill(log, 14)
    assert await log.verify() == audit_module.VerifyReport(True, 14, None)

    tamper(tmp_path / "node.db", "DELETE FROM audit_log WHERE seq = 9")  # first of batch 3

    report = await log.verify()
    assert report.records == 8
    assert report.first_problem is not None and report.first_problem.startswith("seq 10:")


# --- a failed write refuses, and leaves the chain intact ---


async def test_a_read_only_database_refuses_the_append(store: NodeStore, log: AuditLog) -> None:
    await fill(log, 3)
    async with store.database.read("test") as db:
        await db.execute("PRAGMA query_only = ON")

    with pytest.raises(Unavailable, match=r"^the audit log cannot be written: .*readonly"):
        await log.append(search())

    async with store.database.read("test") as db:
        await db.execute("PRAGMA query_only = OFF")
    assert await log.verify() == audit_module.VerifyReport(True, 3, None)
    assert (await log.append(search())).seq == 4


async def test_a_failure_inside_the_transaction_rolls_the_record_back(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row is inserted, then the transaction fails (disk full at commit, say)."""
    await fill(log, 3)
    insert = audit_module._insert

    def insert_then_fail(*args: Any) -> None:
        insert(*args)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(audit_module, "_insert", insert_then_fail)
    with pytest.raises(Unavailable, match="disk is full"):
        await log.append(search())
    monkeypatch.undo()

    assert await log.verify() == audit_module.VerifyReport(True, 3, None)
    assert (await log.append(search())).seq == 4


async def test_a_locked_database_refuses_the_append(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    db = await Database.open(path, MIGRATIONS, FakeClock(), owner="node", busy_timeout_ms=50)
    log = AuditLog(db, FakeClock())
    await log.append(search())
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(Unavailable, match="locked"):
            await log.append(search())
    finally:
        other.execute("ROLLBACK")
        other.close()
    try:
        assert (await log.append(search())).seq == 2
        assert (await log.verify()).ok
    finally:
        await db.close()


# --- concurrency ---


async def test_concurrent_appends_keep_one_chain(log: AuditLog) -> None:
    written = await asyncio.gather(*(log.append(search(patient_key=n)) for n in range(200)))

    assert sorted(r.seq for r in written) == list(range(1, 201))
    assert await log.verify() == audit_module.VerifyReport(True, 200, None)


async def test_two_connections_appending_keep_one_chain(tmp_path: Path, store: NodeStore) -> None:
    """The node server and the admin CLI each hold a connection to one file."""
    other = await NodeStore.open(tmp_path / "node.db", FakeClock())
    try:
        logs = [AuditLog(store.database, FakeClock()), AuditLog(other.database, FakeClock())]
        await asyncio.gather(*(logs[n % 2].append(search(patient_key=n)) for n in range(100)))
        assert await logs[1].verify() == audit_module.VerifyReport(True, 100, None)
    finally:
        await other.close()


async def test_a_cancelled_append_leaves_the_log_writable(log: AuditLog) -> None:
    """A client hanging up cancels its handler at any await inside the append."""
    for pause in range(8):
        append = asyncio.create_task(log.append(search()))
        for _ in range(pause):
            await asyncio.sleep(0)
        append.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await append
        await log.append(search())  # raises Unavailable if the connection was left in a transaction

    report = await log.verify()
    assert report.ok and 8 <= report.records <= 16


# --- export ---


async def test_export_returns_one_patients_records_oldest_first(log: AuditLog) -> None:
    mine = [
        await log.append(search(patient_key=1, pseudonym=PSEUDONYM_A)),
        await log.append(search(patient_key=None, pseudonym=PSEUDONYM_A, side="asking")),
        await log.append(AuditRecord("consent-add", "granted", "local", patient_key=1)),
    ]
    await log.append(search(patient_key=2, pseudonym=PSEUDONYM_B))
    await log.append(search(patient_key=None, pseudonym=PSEUDONYM_B, side="asking"))
    await log.append(AuditRecord("ingest", "granted", "local"))
    mine.append(await log.append(search(patient_key=1, pseudonym="", outcome="denied")))

    assert await log.export(1, PSEUDONYM_A) == mine
    assert await log.export(1, "") == [mine[0], mine[2], mine[3]]
    assert await log.export(None, PSEUDONYM_A.upper()) == mine[:2]
    assert await log.export(3, "cc" * 32) == []
    with pytest.raises(ValueError):
        await log.export(None, "")


# --- the CLI ---


def admin_run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ADMIN, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=60
    )


async def test_cli_verify_reports_intact_then_the_tampered_seq(
    tmp_path: Path, log: AuditLog
) -> None:
    await fill(log, 7)
    path = tmp_path / "node.db"

    ok = await asyncio.to_thread(admin_run, "audit", "verify", "--db", path)
    with sqlite3.connect(path) as db:
        (last,) = db.execute("SELECT hash FROM audit_log WHERE seq = 7").fetchone()
    assert (ok.returncode, ok.stdout) == (
        0,
        f"ok: 7 records, chain intact\nlast: seq 7, hash {last.hex()}\n",
    ), ok.stderr

    tamper(path, "UPDATE audit_log SET clinician_id = 'someone.else' WHERE seq = 4")
    broken = await asyncio.to_thread(admin_run, "audit", "verify", "--db", path)
    assert broken.returncode == 1, broken.stderr
    assert broken.stdout.startswith("broken: seq 4: hash mismatch")


def test_cli_verify_refuses_a_missing_or_foreign_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    run = admin_run("audit", "verify", "--db", missing)
    assert run.returncode == 2
    assert run.stderr == f"transmural-admin: no node database at {missing}\n"
    assert not missing.exists()

    other = tmp_path / "other.db"
    sqlite3.connect(other).close()  # an empty SQLite file: not a node's
    run = admin_run("audit", "verify", "--db", other)
    assert run.returncode == 2 and "holds no audit log" in run.stderr

    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, but long enough to be read as a header")
    run = admin_run("audit", "verify", "--db", text)
    assert run.returncode == 2 and "cannot read node database" in run.stderr


def node_with_patients(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """A node config and database holding two patients: (config, identifiers, pseudonyms)."""
    key = new_network_key()
    write_network_key(tmp_path / "network.key", key)
    config = NodeConfig(
        node_id="node-1", organisation_name="Test", organisation_id="ura:1",
        registry="127.0.0.1:1", database=tmp_path / "node.db",
        network_key_file=tmp_path / "network.key", insecure_dev=True,
    )  # fmt: skip
    path = tmp_path / "node.toml"
    path.write_text(config.to_toml(tmp_path))
    generate(tmp_path / "bundles", patients=2)

    async def load() -> tuple[list[str], list[str]]:
        store = await NodeStore.open(config.database)
        try:
            await ingest_folder(
                store, tmp_path / "bundles", Pseudonymiser(key), config.national_system
            )
            patients = (await store.patients())[:2]
            log = AuditLog(store.database, FakeClock())
            for patient in patients:
                assert patient.identifier is not None and patient.pseudonym is not None
                pseudonym = patient.pseudonym.hex()
                await log.append(search(patient.patient_key, pseudonym, clinician_id="dr.a"))
                await log.append(search(None, pseudonym, side="asking", outcome="denied"))
        finally:
            await store.close()
        return (
            [p.identifier.token for p in patients if p.identifier],
            [p.pseudonym.hex() for p in patients if p.pseudonym],
        )

    identifiers, pseudonyms = asyncio.run(load())
    return path, identifiers, pseudonyms


def test_cli_export_gives_one_patients_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, identifiers, pseudonyms = node_with_patients(tmp_path)

    assert admin.main(["audit", "export", "--config", str(config),
                       "--patient", identifiers[0], "--json"]) == 0  # fmt: skip
    history = json.loads(capsys.readouterr().out)

    assert history["pseudonym"] == pseudonyms[0]
    actions = [(r["action"], r["side"], r["outcome"]) for r in history["records"]]
    assert actions == [
        ("search", "answering", "granted"),
        ("search", "asking", "denied"),
        ("audit-export", "local", "granted"),  # reading the history is logged too
    ]
    assert all(r["pseudonym"] == pseudonyms[0] for r in history["records"])

    assert admin.main(["audit", "export", "--config", str(config),
                       "--patient", identifiers[1]]) == 0  # fmt: skip
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("time (UTC)")
    assert len(table) == 1 + 3  # header; two searches and this export, none of patient 1's
    assert "dr.a (physician) for dr.de.vries" in table[1] and "ura:1" in table[1]
    assert "consent: permit-all" in table[1]


def test_cli_export_of_an_unknown_patient_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _, _ = node_with_patients(tmp_path)

    code = admin.main(
        ["audit", "export", "--config", str(config), "--patient", "urn:example:mrn|nobody"]
    )

    assert code == 1
    assert "no patient with that identifier" in capsys.readouterr().err


async def test_appends_arriving_together_are_written_in_one_transaction(
    tmp_path: Path,
) -> None:
    """Group commit: twenty answers logged at once cost one transaction, not twenty."""
    db = await Database.open(
        tmp_path / "node.db", MIGRATIONS, FakeClock(), owner="node", busy_timeout_ms=1000
    )
    opened: list[str] = []
    run = db.run

    async def counted(name: str, work: Any, *, write: bool) -> Any:
        opened.append(name)
        return await run(name, work, write=write)

    db.run = counted  # type: ignore[method-assign]
    log = AuditLog(db, FakeClock())
    try:
        stored = await asyncio.gather(
            *(log.append(search(correlation_id=f"c{i}")) for i in range(20))
        )
        assert [r.seq for r in stored] == list(range(1, 21))  # in the order appended
        assert [r.correlation_id for r in stored] == [f"c{i}" for i in range(20)]
        assert opened == ["audit_append"]
        assert await log.verify() == audit_module.VerifyReport(True, 20, None)
    finally:
        await db.close()
