"""The SQLite plumbing both stores share: migrations, transactions, refusing bad files."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from node.migrations import MIGRATIONS as NODE_MIGRATIONS
from node.store import NodeStore
from registry.store import RegistryStore
from transmural.clock import SystemClock
from transmural.database import APPLICATION_IDS, Database, statements
from transmural.errors import ConfigError

CREATE = """
-- A log of which migration ran, in the order they ran.
CREATE TABLE steps (
    n INTEGER NOT NULL
);
INSERT INTO steps (n) VALUES (1);
"""
SECOND = "INSERT INTO steps (n) VALUES (2);"
THIRD = "INSERT INTO steps (n) VALUES (3);"


async def open_test_db(path: Path, migrations: Sequence[str]) -> Database:
    return await Database.open(path, migrations, SystemClock(), owner="test", busy_timeout_ms=1_000)


async def steps_and_versions(db: Database) -> tuple[list[int], list[int]]:
    steps = [row[0] for row in await db.fetch("SELECT n FROM steps ORDER BY rowid")]
    versions = [row[0] for row in await db.fetch("SELECT version FROM schema_version")]
    return steps, versions


async def test_migrations_apply_once_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "test.db"
    db = await open_test_db(path, [CREATE, SECOND])
    await db.close()
    db = await open_test_db(path, [CREATE, SECOND, THIRD])  # only the new one runs
    await db.close()
    db = await open_test_db(path, [CREATE, SECOND, THIRD])  # nothing runs
    try:
        assert await steps_and_versions(db) == ([1, 2, 3], [1, 2, 3])
    finally:
        await db.close()


async def test_a_newer_schema_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "test.db"
    await (await open_test_db(path, [CREATE, SECOND])).close()

    with pytest.raises(ConfigError) as refused:
        await open_test_db(path, [CREATE])

    message = str(refused.value)
    assert f"test database {path}" in message
    assert "schema version 2, newer than this test understands (1)" in message
    assert "upgrade the software" in message


async def test_a_failing_transaction_is_rolled_back(tmp_path: Path) -> None:
    db = await open_test_db(tmp_path / "test.db", [CREATE])
    try:
        async with db.transaction("second") as conn:
            await conn.execute("INSERT INTO steps (n) VALUES (2)")

        with pytest.raises(RuntimeError, match="half-way"):
            async with db.transaction("third") as conn:
                await conn.execute("INSERT INTO steps (n) VALUES (3)")
                raise RuntimeError("half-way")

        assert (await steps_and_versions(db))[0] == [1, 2]
        async with db.transaction("again") as conn:  # the connection is usable again
            await conn.execute("INSERT INTO steps (n) VALUES (4)")
        assert (await steps_and_versions(db))[0] == [1, 2, 4]
    finally:
        await db.close()


async def test_a_failing_commit_is_rolled_back(tmp_path: Path) -> None:
    """A deferred foreign key fails at COMMIT, which leaves the transaction open."""
    parents = """
    CREATE TABLE parents (id INTEGER PRIMARY KEY);
    CREATE TABLE children (
        parent INTEGER NOT NULL REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED
    );
    """
    db = await open_test_db(tmp_path / "test.db", [parents])
    try:
        with pytest.raises(sqlite3.IntegrityError):
            async with db.transaction("orphan") as conn:
                await conn.execute("INSERT INTO children (parent) VALUES (7)")

        assert await db.fetch("SELECT * FROM children") == []
        async with db.transaction("parent") as conn:
            await conn.execute("INSERT INTO parents (id) VALUES (7)")
            await conn.execute("INSERT INTO children (parent) VALUES (7)")
        assert [tuple(row) for row in await db.fetch("SELECT parent FROM children")] == [(7,)]
    finally:
        await db.close()


async def test_a_file_that_is_not_a_database_is_refused_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "not-a.db"
    await asyncio.to_thread(bad.write_bytes, b"this is not an SQLite database" * 10)

    with pytest.raises(ConfigError, match=re.escape(f"cannot use test database {bad}: ")):
        await open_test_db(bad, [CREATE])


async def test_run_commits_what_work_wrote_and_rolls_back_when_it_raises(tmp_path: Path) -> None:
    db = await open_test_db(tmp_path / "t.db", ["CREATE TABLE t (x INTEGER);"])
    try:

        def add(value: int, fail: bool, conn: sqlite3.Connection) -> int:
            conn.execute("INSERT INTO t (x) VALUES (?)", (value,))
            if fail:
                raise sqlite3.OperationalError("disk full, say")
            return value

        assert await db.run("add", lambda c: add(1, False, c), write=True) == 1
        with pytest.raises(sqlite3.OperationalError, match="disk full"):
            await db.run("add", lambda c: add(2, True, c), write=True)
        rows = await db.run("read", lambda c: c.execute("SELECT x FROM t").fetchall(), write=False)
        assert [tuple(r) for r in rows] == [(1,)]
        # The connection is not left inside the failed transaction.
        async with db.transaction("after") as conn:
            await conn.execute("INSERT INTO t (x) VALUES (3)")
        assert [r[0] for r in await db.fetch("SELECT x FROM t ORDER BY x")] == [1, 3]
    finally:
        await db.close()


async def test_run_finishes_its_transaction_when_the_caller_is_cancelled(tmp_path: Path) -> None:
    db = await open_test_db(tmp_path / "t.db", ["CREATE TABLE t (x INTEGER);"])
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:

        def slow_add(conn: sqlite3.Connection) -> None:
            loop.call_soon_threadsafe(started.set)
            conn.execute("INSERT INTO t (x) VALUES (1)")
            time.sleep(0.2)  # on the database's thread, not the event loop

        task = asyncio.ensure_future(db.run("slow", slow_add, write=True))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The next statement queues behind the transaction, which committed whole.
        assert [r[0] for r in await db.fetch("SELECT x FROM t")] == [1]
        async with db.transaction("after") as conn:
            await conn.execute("INSERT INTO t (x) VALUES (2)")
    finally:
        await db.close()


async def test_a_node_and_a_registry_database_are_not_taken_for_each_other(
    tmp_path: Path,
) -> None:
    node_db, registry_db = tmp_path / "node.db", tmp_path / "registry.db"
    await (await NodeStore.open(node_db)).close()
    await (await RegistryStore.open(registry_db)).close()
    before = {p: p.read_bytes() for p in (node_db, registry_db)}

    with pytest.raises(ConfigError, match=f"{node_db} is a node's database, not a registry's"):
        await RegistryStore.open(node_db)
    with pytest.raises(ConfigError, match=f"{registry_db} is a registry's database, not a node's"):
        await NodeStore.open(registry_db)
    assert {p: p.read_bytes() for p in before} == before  # nothing migrated onto either


async def test_a_database_from_before_the_mark_is_recognised_and_marked(tmp_path: Path) -> None:
    older, foreign = tmp_path / "older.db", tmp_path / "foreign.db"
    with sqlite3.connect(older) as db:  # a node database as made before the mark: no id
        for statement in statements(NODE_MIGRATIONS[0]):
            db.execute(statement)
        db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
        db.execute("INSERT INTO schema_version VALUES (1, '2026-01-01T00:00:00Z')")
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE customers (name TEXT)")

    await (await NodeStore.open(older)).close()
    with sqlite3.connect(older) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_IDS["node"]
    with pytest.raises(ConfigError, match=r"holds tables, but not a registry's \(no "):
        await RegistryStore.open(foreign)
    with sqlite3.connect(foreign) as db:  # untouched: no schema_version, no mark
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["customers"]
