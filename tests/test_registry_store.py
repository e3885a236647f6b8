"""The registry's domain and store, below gRPC: times, atomicity, migrations, a model check."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.index import IndexChange, MasterPatientIndex, NodeDirectory, NodeRecord
from registry.store import SCHEMA_VERSION, RegistryStore
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
