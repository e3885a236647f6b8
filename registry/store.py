"""SQLite storage of the node directory and the pseudonymised index.

The file is a ``transmural.database.Database``: one aiosqlite connection
runs every statement in order on its own thread, so it is the single writer;
each operation is one named transaction (``BEGIN IMMEDIATE`` for writes, so
a write never upgrades a read lock half-way) or one named read, never
interleaved with another on the shared connection. Every awaited call is a
thread hop of a few hundred µs, so a batch is one ``executemany`` and a
locate one query.

The schema holds pseudonyms (32-byte BLOBs, checked by the table), node ids
and times: no column can hold an identifier, a patient name or a birth date.
Schema changes are numbered migrations recorded in ``schema_version``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from registry import const
from registry.index import NodeRecord
from transmural.clock import Clock, SystemClock
from transmural.database import Database

_V1 = """
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY NOT NULL,
    organisation_name TEXT NOT NULL,
    organisation_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    registered_at REAL NOT NULL,
    updated_at REAL NOT NULL
);

CREATE TABLE index_entries (
    pseudonym BLOB NOT NULL
        CHECK (typeof(pseudonym) = 'blob' AND length(pseudonym) = 32),
    node_id TEXT NOT NULL REFERENCES nodes (node_id),
    updated_at REAL NOT NULL,
    PRIMARY KEY (pseudonym, node_id)
) WITHOUT ROWID;
"""

#: Numbered schema migrations (``MIGRATIONS[n - 1]`` makes version ``n``);
#: never edit a released one, add the next.
MIGRATIONS: list[str] = [_V1]
SCHEMA_VERSION = len(MIGRATIONS)

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


class RegistryStore:
    """The registry's SQLite database; satisfies ``registry.index.RegistryStorage``."""

    def __init__(self, db: Database) -> None:
        """Wrap an open database; use ``RegistryStore.open`` to get one ready."""
        self._db = db

    @classmethod
    async def open(cls, path: Path | str, clock: Clock | None = None) -> RegistryStore:
        """Open (creating if needed) and migrate the database; ConfigError if unusable."""
        db = await Database.open(
            path,
            MIGRATIONS,
            clock or SystemClock(),
            owner="registry",
            busy_timeout_ms=const.SQLITE_BUSY_TIMEOUT_MS,
        )
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def upsert_node(self, node: NodeRecord, now: float) -> NodeRecord:
        """Insert or update a directory entry; ``registered_at`` stays the first time."""
        async with self._db.transaction("upsert_node") as db:
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
        async with self._db.read("get_node") as db:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id = ?", (node_id,)
                )
            )
        return NodeRecord(*rows[0]) if rows else None

    async def list_nodes(self) -> list[NodeRecord]:
        async with self._db.read("list_nodes") as db:
            rows = await db.execute_fetchall(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY node_id")
        return [NodeRecord(*row) for row in rows]

    async def publish(
        self, node_id: str, published: Sequence[bytes], withdrawn: Sequence[bytes], now: float
    ) -> None:
        """Upsert ``published`` and delete ``withdrawn`` entries of one node, atomically."""
        async with self._db.transaction("publish") as db:
            if published:
                await db.executemany(_UPSERT_ENTRY, [(p, node_id, now) for p in published])
            if withdrawn:
                await db.executemany(_DELETE_ENTRY, [(p, node_id) for p in withdrawn])

    async def holders(self, pseudonyms: Sequence[bytes]) -> dict[bytes, list[NodeRecord]]:
        """Holders of each pseudonym that has any, in a query per ``LOCATE_QUERY_CHUNK``."""
        found: dict[bytes, list[NodeRecord]] = {}
        nodes: dict[str, NodeRecord] = {}
        step = const.LOCATE_QUERY_CHUNK
        async with self._db.read("locate") as db:
            for start in range(0, len(pseudonyms), step):
                chunk = pseudonyms[start : start + step]
                sql = _LOCATE.format(", ".join("?" * len(chunk)))
                for pseudonym, *node_row in await db.execute_fetchall(sql, chunk):
                    node = nodes.get(node_row[0])
                    if node is None:
                        node = nodes[node_row[0]] = NodeRecord(*node_row)
                    found.setdefault(pseudonym, []).append(node)
        return found
