"""SQLite storage of the node directory and the pseudonymised index.

One aiosqlite connection runs every statement in order on its own thread,
so it is the single writer. Each operation is one named transaction
(``BEGIN IMMEDIATE`` for writes, so a write never upgrades a read lock
half-way); an asyncio lock keeps operations from interleaving on the shared
connection between awaits. Every awaited call is a thread hop of a few
hundred µs, so a batch is one ``executemany`` and a locate one query.

The schema holds pseudonyms (32-byte BLOBs, checked by the table), node ids
and times: no column can hold an identifier, a patient name or a birth date.
Schema changes are numbered migrations recorded in ``schema_version``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from registry import const
from registry.index import NodeRecord
from transmural.clock import Clock, SystemClock
from transmural.errors import ConfigError

log = logging.getLogger(__name__)

#: Numbered schema migrations; never edit a released one, add the next.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """
        CREATE TABLE nodes (
            node_id TEXT PRIMARY KEY NOT NULL,
            organisation_name TEXT NOT NULL,
            organisation_id TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            registered_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE index_entries (
            pseudonym BLOB NOT NULL
                CHECK (typeof(pseudonym) = 'blob' AND length(pseudonym) = 32),
            node_id TEXT NOT NULL REFERENCES nodes (node_id),
            updated_at REAL NOT NULL,
            PRIMARY KEY (pseudonym, node_id)
        ) WITHOUT ROWID
        """,
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)

_NODE_COLUMNS = "node_id, organisation_name, organisation_id, endpoint, registered_at, updated_at"
_UPSERT_NODE = f"""
    INSERT INTO nodes ({_NODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (node_id) DO UPDATE SET
        organisation_name = excluded.organisation_name,
        organisation_id = excluded.organisation_id,
        endpoint = excluded.endpoint,
        updated_at = excluded.updated_at
    RETURNING {_NODE_COLUMNS}
"""
_UPSERT_ENTRY = """
    INSERT INTO index_entries (pseudonym, node_id, updated_at) VALUES (?, ?, ?)
    ON CONFLICT (pseudonym, node_id) DO UPDATE SET updated_at = excluded.updated_at
"""
_DELETE_ENTRY = "DELETE FROM index_entries WHERE pseudonym = ? AND node_id = ?"
_LOCATE = """
    SELECT e.pseudonym, n.node_id, n.organisation_name, n.organisation_id, n.endpoint,
           n.registered_at, n.updated_at
    FROM index_entries AS e JOIN nodes AS n ON n.node_id = e.node_id
    WHERE e.pseudonym IN ({})
    ORDER BY e.pseudonym, n.node_id
"""


def _try_open(path: str) -> None:
    sqlite3.connect(path).close()


class RegistryStore:
    """The registry's SQLite database; satisfies ``registry.index.RegistryStorage``."""

    def __init__(self, db: aiosqlite.Connection, clock: Clock | None = None) -> None:
        """Wrap an open connection; use ``RegistryStore.open`` to get one ready."""
        self._db = db
        self._clock = clock or SystemClock()
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str, clock: Clock | None = None) -> RegistryStore:
        """Open (creating if needed) and migrate the database; ConfigError if unusable."""
        try:
            # Open once in plain sqlite3 first: aiosqlite's own failed connect
            # leaves its worker thread to report into a loop that may be gone.
            await asyncio.to_thread(_try_open, str(path))
            db = await aiosqlite.connect(str(path), isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open registry database {path}: {exc}") from exc
        store = cls(db, clock)
        try:
            await store._configure()
            await store._migrate()
        except sqlite3.Error as exc:
            await db.close()
            raise ConfigError(f"cannot use registry database {path}: {exc}") from exc
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    async def _configure(self) -> None:
        await self._db.execute(f"PRAGMA busy_timeout = {const.SQLITE_BUSY_TIMEOUT_MS}")
        rows = list(await self._db.execute_fetchall("PRAGMA journal_mode = WAL"))
        mode = str(rows[0][0]).lower() if rows else ""
        if mode not in ("wal", "memory"):
            raise ConfigError(f"registry database cannot use write-ahead logging (got {mode!r})")
        await self._db.execute("PRAGMA synchronous = NORMAL")
        await self._db.execute("PRAGMA foreign_keys = ON")

    async def _migrate(self) -> None:
        """Bring the schema to ``SCHEMA_VERSION`` in one transaction."""
        async with self._transaction("migrate") as db:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY NOT NULL, applied_at REAL NOT NULL)"
            )
            rows = list(await db.execute_fetchall("SELECT max(version) FROM schema_version"))
            current = int(rows[0][0] or 0)
            if current > SCHEMA_VERSION:
                raise ConfigError(
                    f"registry database schema version {current} is newer than this "
                    f"registry understands ({SCHEMA_VERSION}); upgrade transmural"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, self._clock.now()),
                )
                log.info("registry database migrated to schema version %s", version)

    @asynccontextmanager
    async def _transaction(self, name: str) -> AsyncIterator[aiosqlite.Connection]:
        """One named write transaction; rolled back if anything in it fails."""
        async with self._lock:
            started = self._clock.monotonic()
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                await self._db.execute("COMMIT")
            except BaseException:
                await self._rollback(name)
                raise
            log.debug(
                "transaction %s took %.1f ms", name, (self._clock.monotonic() - started) * 1000
            )

    async def _rollback(self, name: str) -> None:
        try:
            await self._db.execute("ROLLBACK")
        except sqlite3.Error:
            # A failed COMMIT may already have ended the transaction.
            log.debug("transaction %s had nothing to roll back", name)
        else:
            log.debug("transaction %s rolled back", name)

    @asynccontextmanager
    async def _read(self, name: str) -> AsyncIterator[aiosqlite.Connection]:
        """A named read; waits for any write in progress so it never sees half of one."""
        async with self._lock:
            started = self._clock.monotonic()
            yield self._db
            log.debug("read %s took %.1f ms", name, (self._clock.monotonic() - started) * 1000)

    async def upsert_node(self, node: NodeRecord, now: float) -> NodeRecord:
        """Insert or update a directory entry; ``registered_at`` stays the first time."""
        async with self._transaction("upsert_node") as db:
            rows = list(
                await db.execute_fetchall(
                    _UPSERT_NODE,
                    (
                        node.node_id,
                        node.organisation_name,
                        node.organisation_id,
                        node.endpoint,
                        now,
                        now,
                    ),
                )
            )
        return NodeRecord(*rows[0])

    async def get_node(self, node_id: str) -> NodeRecord | None:
        async with self._read("get_node") as db:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id = ?", (node_id,)
                )
            )
        return NodeRecord(*rows[0]) if rows else None

    async def list_nodes(self) -> list[NodeRecord]:
        async with self._read("list_nodes") as db:
            rows = await db.execute_fetchall(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY node_id")
        return [NodeRecord(*row) for row in rows]

    async def publish(
        self, node_id: str, published: Sequence[bytes], withdrawn: Sequence[bytes], now: float
    ) -> None:
        """Upsert ``published`` and delete ``withdrawn`` entries of one node, atomically."""
        async with self._transaction("publish") as db:
            if published:
                await db.executemany(_UPSERT_ENTRY, [(p, node_id, now) for p in published])
            if withdrawn:
                await db.executemany(_DELETE_ENTRY, [(p, node_id) for p in withdrawn])

    async def holders(self, pseudonyms: Sequence[bytes]) -> dict[bytes, list[NodeRecord]]:
        """Holders of each pseudonym that has any, in a query per ``LOCATE_QUERY_CHUNK``."""
        found: dict[bytes, list[NodeRecord]] = {}
        nodes: dict[str, NodeRecord] = {}
        step = const.LOCATE_QUERY_CHUNK
        async with self._read("locate") as db:
            for start in range(0, len(pseudonyms), step):
                chunk = pseudonyms[start : start + step]
                sql = _LOCATE.format(", ".join("?" * len(chunk)))
                for pseudonym, *node_row in await db.execute_fetchall(sql, chunk):
                    node = nodes.get(node_row[0])
                    if node is None:
                        node = nodes[node_row[0]] = NodeRecord(*node_row)
                    found.setdefault(pseudonym, []).append(node)
        return found
