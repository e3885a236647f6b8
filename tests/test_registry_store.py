"""The registry's domain and store, below gRPC: times, atomicity, migrations, a model check,
and the membership records (invites, certificates, revocations)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.enrolment import CertificateRecord, InviteRecord, RevocationRecord
from registry.index import IndexChange, MasterPatientIndex, NodeDirectory, NodeRecord
from registry.store import MIGRATIONS, SCHEMA_VERSION, RegistryStore
from transmural.database import Database
from transmural.errors import ConfigError, InvalidInput

NODES = ("alpha", "beta", "gamma")


class FakeClock:
    """A clock that moves only when the test moves it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.time = start

    def now(self) -> float:
        return self.time

    def monotonic(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += seconds


def facility(node_id: str, port: int = 7401) -> NodeRecord:
    return NodeRecord(node_id, f"Facility {node_id}", "", f"127.0.0.1:{port}")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[RegistryStore]:
    opened = await RegistryStore.open(tmp_path / "registry.db", clock)
    yield opened
    await opened.close()


async def test_reregistering_keeps_the_first_registration_time(
    store: RegistryStore, clock: FakeClock
) -> None:
    directory = NodeDirectory(store, clock)
    first = await directory.register(facility("alpha", 7401))
    clock.advance(60)

    again = await directory.register(facility("alpha", 7409))

    assert (first.registered_at, first.updated_at) == (clock.time - 60, clock.time - 60)
    assert (again.registered_at, again.updated_at) == (clock.time - 60, clock.time)
    assert again.endpoint == "127.0.0.1:7409"
    assert await directory.list_nodes() == [again]


async def test_publish_refreshes_the_entry_time(
    store: RegistryStore, clock: FakeClock, tmp_path: Path
) -> None:
    directory = NodeDirectory(store, clock)
    index = MasterPatientIndex(store, directory, clock)
    await directory.register(facility("alpha"))
    await index.publish("alpha", [IndexChange(b"p" * 32)])
    clock.advance(5)
    await index.publish("alpha", [IndexChange(b"p" * 32)])

    def entry_times() -> list[tuple[float]]:
        with sqlite3.connect(tmp_path / "registry.db") as conn:
            rows = conn.execute("SELECT updated_at FROM index_entries").fetchall()
        conn.close()
        return rows

    assert await asyncio.to_thread(entry_times) == [(clock.time,)]


async def test_a_failing_batch_leaves_nothing_behind(store: RegistryStore) -> None:
    await store.upsert_node(facility("alpha"), 1.0)
    await store.publish("alpha", [b"a" * 32], [], 1.0)

    # The table itself refuses a short pseudonym, after the first row went in.
    with pytest.raises(sqlite3.IntegrityError):
        await store.publish("alpha", [b"b" * 32, b"c" * 31], [b"a" * 32], 2.0)

    found = await store.holders([b"a" * 32, b"b" * 32])
    assert {p: [n.node_id for n in nodes] for p, nodes in found.items()} == {b"a" * 32: ["alpha"]}
    # And the connection is usable again: the transaction was rolled back.
    await store.publish("alpha", [b"b" * 32], [], 3.0)
    assert b"b" * 32 in await store.holders([b"b" * 32])


async def test_the_store_refuses_entries_of_unknown_nodes(store: RegistryStore) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        await store.publish("nobody", [b"a" * 32], [], 1.0)


async def test_domain_checks_come_before_storage(store: RegistryStore, clock: FakeClock) -> None:
    directory = NodeDirectory(store, clock)
    index = MasterPatientIndex(store, directory, clock)

    with pytest.raises(InvalidInput, match="node_id is empty"):
        await index.publish("", [])
    with pytest.raises(InvalidInput, match=r"entry 0: a pseudonym is 32 bytes .*not 0"):
        await index.locate([b""])
    assert await index.locate([]) == []


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    await (await RegistryStore.open(db)).close()

    def bump() -> None:
        with sqlite3.connect(db) as conn:
            conn.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
        conn.close()

    await asyncio.to_thread(bump)

    with pytest.raises(ConfigError, match="newer than this registry understands"):
        await RegistryStore.open(db)


async def test_reopening_does_not_migrate_again(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    await (await RegistryStore.open(db)).close()
    await (await RegistryStore.open(db)).close()

    def versions() -> list[tuple[int]]:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT version FROM schema_version").fetchall()
        conn.close()
        return rows

    assert await asyncio.to_thread(versions) == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


async def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "registry.db"
    await asyncio.to_thread(bad.write_bytes, b"this is not an SQLite database" * 10)

    with pytest.raises(ConfigError, match="cannot use registry database"):
        await RegistryStore.open(bad)


batches = st.lists(
    st.tuples(
        st.sampled_from(NODES),
        st.lists(st.tuples(st.integers(0, 15), st.booleans()), max_size=12),
    ),
    max_size=8,
)


async def replay(history: list[tuple[str, list[tuple[int, bool]]]]) -> None:
    clock = FakeClock()
    store = await RegistryStore.open(":memory:", clock)
    try:
        directory = NodeDirectory(store, clock)
        index = MasterPatientIndex(store, directory, clock)
        for port, node_id in enumerate(NODES, start=7401):
            await directory.register(facility(node_id, port))
        model: set[tuple[int, str]] = set()
        for node_id, changes in history:
            await index.publish(
                node_id, [IndexChange(bytes([i]) * 32, gone) for i, gone in changes]
            )
            for i, gone in changes:
                (model.discard if gone else model.add)((i, node_id))

        asked = list(range(16))
        located = await index.locate([bytes([i]) * 32 for i in asked])

        assert [[h.node_id for h in loc.holders] for loc in located] == [
            sorted(n for j, n in model if j == i) for i in asked
        ]
    finally:
        await store.close()


@settings(max_examples=40, deadline=None)
@given(history=batches)
def test_the_index_matches_a_model_of_publish_and_withdraw(
    history: list[tuple[str, list[tuple[int, bool]]]],
) -> None:
    asyncio.run(replay(history))


# --- membership ---


def invite_record(secret: bytes, node_id: str, expires_at: float) -> InviteRecord:
    return InviteRecord(
        secret_hash=hashlib.sha256(secret).digest(),
        node_id=node_id,
        organisation_id=f"URA-{node_id}",
        organisation_name=f"Facility {node_id}",
        created_at=0.0,
        expires_at=expires_at,
    )


def certificate(serial: str, node_id: str) -> CertificateRecord:
    return CertificateRecord(serial, node_id, f"URA-{node_id}", 0.0, 10**10)


async def test_an_expired_invite_no_longer_holds_its_node_id(store: RegistryStore) -> None:
    assert await store.add_invite(invite_record(b"a", "alpha", 100.0), now=50.0) is None
    assert await store.add_invite(invite_record(b"b", "alpha", 200.0), now=99.0) == "invite"
    assert await store.add_invite(invite_record(b"c", "alpha", 300.0), now=100.0) is None


async def test_redeeming_is_single_use_and_all_or_nothing(store: RegistryStore) -> None:
    record = invite_record(b"a", "alpha", 100.0)
    await store.add_invite(record, now=0.0)

    assert not await store.redeem_invite(record.secret_hash, certificate("01", "alpha"), 100.0)
    assert await store.redeem_invite(record.secret_hash, certificate("02", "alpha"), 99.0)
    assert not await store.redeem_invite(record.secret_hash, certificate("03", "alpha"), 99.5)
    assert not await store.redeem_invite(b"\0" * 32, certificate("04", "alpha"), 1.0)

    stored = await store.get_invite(record.secret_hash)
    assert stored is not None and stored.used_at == 99.0
    # Only the one certificate, and the node id is held by it now.
    assert await store.add_invite(invite_record(b"b", "alpha", 500.0), now=200.0) == "certificate"
    known, revoked = await store.revoke_organisation("URA-alpha", 300.0)
    assert (known, [r.serial for r in revoked]) == (1, ["02"])
    assert await store.add_invite(invite_record(b"b", "alpha", 500.0), now=301.0) is None


async def test_revoking_removes_the_nodes_from_directory_and_index(store: RegistryStore) -> None:
    await store.add_invite(invite_record(b"a", "alpha", 100.0), now=0.0)
    await store.redeem_invite(hashlib.sha256(b"a").digest(), certificate("0a", "alpha"), 1.0)
    await store.upsert_node(facility("alpha"), 2.0)
    await store.upsert_node(facility("beta", 7402), 2.0)
    await store.publish("alpha", [b"p" * 32], [], 3.0)
    await store.publish("beta", [b"p" * 32], [], 3.0)

    known, revoked = await store.revoke_organisation("URA-alpha", 4.0)

    assert (known, revoked) == (1, [RevocationRecord("0a", "alpha", "URA-alpha", 4.0)])
    assert [n.node_id for n in await store.list_nodes()] == ["beta"]
    assert [n.node_id for n in (await store.holders([b"p" * 32]))[b"p" * 32]] == ["beta"]
    assert await store.revocations() == revoked
    assert await store.revoke_organisation("URA-alpha", 5.0) == (1, [])
    assert await store.revoke_organisation("URA-nobody", 5.0) == (0, [])


async def test_membership_reads_certificates_newest_first_with_their_invites_names(
    store: RegistryStore,
) -> None:
    async def joins(secret: bytes, serial: str, at: float) -> None:
        await store.add_invite(invite_record(secret, "alpha", at + 100), now=at - 1)
        issued = CertificateRecord(serial, "alpha", "URA-alpha", at, at + 1000)
        assert await store.redeem_invite(hashlib.sha256(secret).digest(), issued, at)

    await joins(b"a1", "0a", 10.0)
    await store.revoke_organisation("URA-alpha", 20.0)
    await joins(b"a2", "0b", 30.0)  # re-joined: a new certificate for the same node
    await store.upsert_node(facility("alpha"), 31.0)
    await store.add_invite(invite_record(b"b", "beta", 500.0), now=40.0)
    await store.add_invite(invite_record(b"g", "gamma", 500.0), now=40.0)
    await store.close_open_invites("URA-gamma", 41.0)

    rows = await store.membership()

    assert [
        (c.certificate.serial, c.certificate.issued_at, c.organisation_name, c.revoked_at)
        for c in rows.certificates
    ] == [("0b", 30.0, "Facility alpha", None), ("0a", 10.0, "Facility alpha", 20.0)]
    assert [(i.node_id, i.closed_because) for i in rows.unused_invites] == [
        ("beta", None), ("gamma", "revoked")
    ]  # fmt: skip
    assert [(n.node_id, n.updated_at) for n in rows.directory] == [("alpha", 31.0)]


async def test_a_version_1_database_is_migrated_keeping_its_data(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    old = await Database.open(db, MIGRATIONS[:1], FakeClock(), owner="registry", busy_timeout_ms=1)
    async with old.transaction("seed") as conn:
        await conn.execute(
            "INSERT INTO nodes VALUES ('alpha', 'Facility alpha', '', '127.0.0.1:7401', 1, 1)"
        )
    await old.close()

    store = await RegistryStore.open(db)
    try:
        assert [n.node_id for n in await store.list_nodes()] == ["alpha"]
        assert await store.revocations() == []
    finally:
        await store.close()


async def test_closing_an_invite_says_when_and_why_and_older_invites_read(
    tmp_path: Path,
) -> None:
    db = tmp_path / "registry.db"
    old = await Database.open(db, MIGRATIONS[:4], FakeClock(), owner="registry", busy_timeout_ms=1)
    async with old.transaction("seed") as conn:  # closed before closes were recorded
        await conn.execute(
            "INSERT INTO invites VALUES (?, 'alpha', 'URA-alpha', 'A', 0, 5, NULL, '')",
            (hashlib.sha256(b"old").digest(),),
        )
    await old.close()

    store = await RegistryStore.open(db)
    try:
        older = await store.get_invite(hashlib.sha256(b"old").digest())
        assert older is not None and (older.closed_at, older.closed_because) == (None, None)
        for secret, node_id in ((b"a", "alpha"), (b"b", "beta")):
            await store.add_invite(invite_record(secret, node_id, 100.0), now=10.0)
        assert await store.close_invite(hashlib.sha256(b"a").digest(), 20.0)
        assert await store.close_open_invites("URA-beta", 30.0) == 1
        replaced = await store.get_invite(hashlib.sha256(b"a").digest())
        revoked = await store.get_invite(hashlib.sha256(b"b").digest())
        assert replaced is not None and revoked is not None
        assert (replaced.expires_at, replaced.closed_at, replaced.closed_because) == (
            20.0, 20.0, "replaced"
        )  # fmt: skip
        assert (revoked.expires_at, revoked.closed_at, revoked.closed_because) == (
            30.0, 30.0, "revoked"
        )  # fmt: skip
    finally:
        await store.close()


async def test_the_registry_keeps_a_larger_page_cache(store: RegistryStore) -> None:
    """A 10M-entry index stays fast only if more than SQLite's default 2 MiB is cached."""
    from registry import const

    rows = await store._db.fetch("PRAGMA cache_size")
    assert rows[0][0] == -1024 * const.SQLITE_CACHE_MIB
    assert const.SQLITE_CACHE_MIB > 2


# --- read-only opening (commands that only look) ---


async def test_a_read_only_store_reads_and_refuses_every_write(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    writer = await RegistryStore.open(db)
    await writer.upsert_node(facility("alpha"), now=1.0)
    await writer.close()
    before = await asyncio.to_thread(db.read_bytes)

    reader = await RegistryStore.open(db, read_only=True)
    try:
        assert [n.node_id for n in await reader.list_nodes()] == ["alpha"]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await reader.upsert_node(facility("beta"), now=2.0)
    finally:
        await reader.close()
    assert await asyncio.to_thread(db.read_bytes) == before


async def test_read_only_refuses_a_missing_or_empty_file_without_making_one(
    tmp_path: Path,
) -> None:
    missing, empty = tmp_path / "missing.db", tmp_path / "empty.db"
    await asyncio.to_thread(empty.write_bytes, b"")

    with pytest.raises(ConfigError, match=f"^there is no registry database {missing}$"):
        await RegistryStore.open(missing, read_only=True)
    with pytest.raises(ConfigError, match="is not a registry database: it is empty, or another"):
        await RegistryStore.open(empty, read_only=True)

    assert not missing.exists() and empty.read_bytes() == b""


async def test_read_only_refuses_a_node_database_and_an_older_schema_unchanged(
    tmp_path: Path,
) -> None:
    node_db, old_db = tmp_path / "node.db", tmp_path / "old.db"
    await (await Database.open(node_db, ["CREATE TABLE t (x);"], FakeClock(), owner="node",
                               busy_timeout_ms=1)).close()  # fmt: skip
    await (await Database.open(old_db, MIGRATIONS[:4], FakeClock(), owner="registry",
                               busy_timeout_ms=1)).close()  # fmt: skip
    before = await asyncio.to_thread(old_db.read_bytes)

    with pytest.raises(ConfigError, match="is not a registry database: it is a node's database"):
        await RegistryStore.open(node_db, read_only=True)
    older = f"has schema version 4, this registry reads version {SCHEMA_VERSION}: start"
    with pytest.raises(ConfigError, match=older):
        await RegistryStore.open(old_db, read_only=True)

    assert await asyncio.to_thread(old_db.read_bytes) == before
