"""SQLite storage of the node directory and the pseudonymised index.

The file is a ``transmural.database.Database``: one aiosqlite connection
runs every statement in order on its own thread, so it is the single writer;
each operation is one named transaction (``BEGIN IMMEDIATE`` for writes, so
a write never upgrades a read lock half-way) or one named read, never
interleaved with another on the shared connection. Every awaited call is a
thread hop of a few hundred µs, so a batch is one ``executemany``, and
locates that arrive together share one hop (``SharedRead``).

The schema holds pseudonyms (32-byte BLOBs, checked by the table), node ids
and times: no column can hold an identifier, a patient name or a birth date.
Schema changes are numbered migrations recorded in ``schema_version``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from registry import const
from registry.enrolment import (
    CLOSED_REPLACED,
    CLOSED_REVOKED,
    CertificateRecord,
    InviteRecord,
    IssuedCertificate,
    MembershipRows,
    RevocationRecord,
)
from registry.index import NodeRecord
from transmural.clock import Clock, SystemClock
from transmural.database import Database
from transmural.errors import ConfigError
from transmural.shared_read import SharedRead

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

# Membership: invites (only the secret's hash), issued certificates and
# revocations. Still nothing that names a patient.
_V2 = """
CREATE TABLE invites (
    secret_hash BLOB PRIMARY KEY NOT NULL
        CHECK (typeof(secret_hash) = 'blob' AND length(secret_hash) = 32),
    node_id TEXT NOT NULL,
    organisation_id TEXT NOT NULL,
    organisation_name TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
) WITHOUT ROWID;

CREATE INDEX invites_by_node ON invites (node_id);

CREATE TABLE certificates (
    serial TEXT PRIMARY KEY NOT NULL,
    node_id TEXT NOT NULL,
    organisation_id TEXT NOT NULL,
    issued_at REAL NOT NULL,
    not_after REAL NOT NULL
) WITHOUT ROWID;

CREATE INDEX certificates_by_node ON certificates (node_id);
CREATE INDEX certificates_by_organisation ON certificates (organisation_id);

CREATE TABLE revocations (
    serial TEXT PRIMARY KEY NOT NULL REFERENCES certificates (serial),
    node_id TEXT NOT NULL,
    organisation_id TEXT NOT NULL,
    revoked_at REAL NOT NULL
) WITHOUT ROWID;
"""

#: Numbered schema migrations (``MIGRATIONS[n - 1]`` makes version ``n``);
#: never edit a released one, add the next.
_V3 = """
-- The kind of facility (hospital, gp, pharmacy, nursing-home) an invite is
-- for; written into the node certificate's OU for consent rules by kind.
ALTER TABLE invites ADD COLUMN organisation_category TEXT NOT NULL DEFAULT '';
"""

_V4 = """
-- Which network this database belongs to, set when the registry first serves
-- or invites with a network folder: a folder of another network (a test
-- network's beside production's) is refused instead of serving certificates,
-- invites and an index that its CA and key never made.
CREATE TABLE network_identity (
    only_row       INTEGER PRIMARY KEY CHECK (only_row = 1),
    ca_fingerprint TEXT NOT NULL,
    network_name   TEXT NOT NULL,
    bound_at       REAL NOT NULL
);
"""

_V5 = """
-- An invite the operator withdrew: when, and whether its organisation was
-- revoked or a new invite replaced it. expires_at is set to the same time
-- (what keeps it from joining); these say why, so a node joining with it is
-- not told that an invite shown open until tomorrow has expired, and so a
-- restart of compose does not invite a revoked node again.
ALTER TABLE invites ADD COLUMN closed_at REAL;
ALTER TABLE invites ADD COLUMN closed_because TEXT
    CHECK (closed_because IN ('revoked', 'replaced'));
"""

MIGRATIONS: list[str] = [_V1, _V2, _V3, _V4, _V5]
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


_INVITE_COLUMNS = (
    "secret_hash, node_id, organisation_id, organisation_name, created_at, expires_at, used_at, "
    "organisation_category, closed_at, closed_because"
)
_REVOCATION_COLUMNS = "serial, node_id, organisation_id, revoked_at"
# What makes a node id taken: a certificate not revoked, or an invite still open.
_NODE_ID_HOLDER = """
    SELECT 'certificate' FROM certificates AS c
    WHERE c.node_id = :node_id
      AND NOT EXISTS (SELECT 1 FROM revocations AS r WHERE r.serial = c.serial)
    UNION ALL
    SELECT 'invite' FROM invites
    WHERE node_id = :node_id AND used_at IS NULL AND expires_at > :now
    UNION ALL
    SELECT 'organisation ' || organisation_id FROM certificates
    WHERE node_id = :node_id AND organisation_id != :organisation_id
    UNION ALL
    SELECT 'category ' || last FROM (
        SELECT organisation_category AS last FROM invites
        WHERE node_id = :node_id AND used_at IS NOT NULL ORDER BY used_at DESC LIMIT 1
    ) WHERE last != :category
    LIMIT 1
"""
# When a node id was last revoked (a certificate, or an invite closed by the
# revoke), unless an invite was made for it since: the operator's way back.
_REVOKED_AT = """
    WITH last (at) AS (
        SELECT max(at) FROM (
            SELECT revoked_at AS at FROM revocations WHERE node_id = :node_id
            UNION ALL
            SELECT closed_at FROM invites WHERE node_id = :node_id AND closed_because = :revoked
        )
    )
    SELECT at FROM last
    WHERE at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM invites WHERE node_id = :node_id AND created_at > last.at)
"""
# Each certificate with its revocation and the invite it redeemed (used at the
# moment it was issued: one transaction), for the organisation's name.
_ISSUED = """
    SELECT c.serial, c.node_id, c.organisation_id, c.issued_at, c.not_after,
           coalesce(i.organisation_name, ''), coalesce(i.organisation_category, ''), r.revoked_at
    FROM certificates AS c
    LEFT JOIN revocations AS r ON r.serial = c.serial
    LEFT JOIN invites AS i ON i.node_id = c.node_id AND i.used_at = c.issued_at
    ORDER BY c.organisation_id, c.node_id, c.issued_at DESC, c.serial
"""
_REDEEM = """
    UPDATE invites SET used_at = ?
    WHERE secret_hash = ? AND used_at IS NULL AND expires_at > ?
"""


def _holders_of_each(
    db: sqlite3.Connection, requests: Sequence[Sequence[bytes]]
) -> list[dict[bytes, list[NodeRecord]]]:
    """Holders per request, from one query per ``LOCATE_QUERY_CHUNK`` distinct pseudonyms."""
    wanted = list(dict.fromkeys(p for request in requests for p in request))
    found: dict[bytes, list[NodeRecord]] = {}
    nodes: dict[str, NodeRecord] = {}
    step = const.LOCATE_QUERY_CHUNK
    for start in range(0, len(wanted), step):
        chunk = wanted[start : start + step]
        for pseudonym, *node_row in db.execute(_LOCATE.format(", ".join("?" * len(chunk))), chunk):
            node = nodes.get(node_row[0])
            if node is None:
                node = nodes[node_row[0]] = NodeRecord(*node_row)
            found.setdefault(pseudonym, []).append(node)
    if len(requests) == 1:
        return [found]
    return [{p: found[p] for p in request if p in found} for request in requests]


def _membership(db: sqlite3.Connection) -> MembershipRows:
    """Certificates, unused invites and directory in one snapshot (a revoke beside it
    is seen whole or not at all)."""
    db.execute("BEGIN")
    try:
        issued = [
            IssuedCertificate(CertificateRecord(*row[:5]), *row[5:]) for row in db.execute(_ISSUED)
        ]
        invites = db.execute(
            f"SELECT {_INVITE_COLUMNS} FROM invites WHERE used_at IS NULL"
            " ORDER BY organisation_id, node_id, created_at"
        )
        unused = [InviteRecord(*row) for row in invites]
        nodes = db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY node_id")
        return MembershipRows(issued, unused, [NodeRecord(*row) for row in nodes])
    finally:
        db.execute("COMMIT")


class RegistryStore:
    """The registry's SQLite database.

    Satisfies ``registry.index.RegistryStorage`` and
    ``registry.enrolment.MembershipStorage``.
    """

    def __init__(self, db: Database) -> None:
        """Wrap an open database; use ``RegistryStore.open`` to get one ready."""
        self._db = db
        self._locate = SharedRead(db, "locate", _holders_of_each)

    @classmethod
    async def open(
        cls, path: Path | str, clock: Clock | None = None, *, read_only: bool = False
    ) -> RegistryStore:
        """Open (creating if needed) and migrate the database; ConfigError if unusable.

        ``read_only``: an existing registry database at this schema version,
        opened so that nothing can be written (a look beside the running
        registry must not migrate or change what it serves).
        """
        if read_only:
            return cls(
                await Database.open_read_only(
                    path, MIGRATIONS, clock or SystemClock(), owner="registry"
                )
            )
        db = await Database.open(
            path,
            MIGRATIONS,
            clock or SystemClock(),
            owner="registry",
            busy_timeout_ms=const.SQLITE_BUSY_TIMEOUT_MS,
            cache_mib=const.SQLITE_CACHE_MIB,
        )
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def bind_network(self, ca_fingerprint: str, network_name: str, now: float) -> None:
        """Tie the database to this network, or ConfigError when it is another network's.

        The first network folder served or invited with owns it from then on.
        """
        async with self._db.transaction("bind_network") as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT ca_fingerprint, network_name FROM network_identity"
                )
            )
            if not rows:
                await db.execute(
                    "INSERT INTO network_identity (only_row, ca_fingerprint, network_name,"
                    " bound_at) VALUES (1, ?, ?, ?)",
                    (ca_fingerprint, network_name, now),
                )
                return
        owner_fingerprint, owner_name = rows[0]
        if owner_fingerprint != ca_fingerprint:
            raise ConfigError(
                f"the registry database {self._db.path} belongs to network {owner_name!r} "
                f"(CA {owner_fingerprint[:16]}...), not to {network_name!r} "
                f"(CA {ca_fingerprint[:16]}...): give the --network-dir and --db of one network"
            )

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
        """Holders of each pseudonym that has any; concurrent callers share one read."""
        return await self._locate.ask(pseudonyms)

    # --- membership ---

    async def add_invite(self, record: InviteRecord, now: float) -> str | None:
        """Insert the invite unless its node id is taken; else what holds it.

        The check and the insert are one transaction, so two operators
        inviting one node id at once cannot both succeed.
        """
        async with self._db.transaction("add_invite") as db:
            asked = {
                "node_id": record.node_id,
                "now": now,
                "organisation_id": record.organisation_id,
                "category": record.organisation_category,
            }
            holder = list(await db.execute_fetchall(_NODE_ID_HOLDER, asked))
            if holder:
                return str(holder[0][0])
            await db.execute(
                f"INSERT INTO invites ({_INVITE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.secret_hash,
                    record.node_id,
                    record.organisation_id,
                    record.organisation_name,
                    record.created_at,
                    record.expires_at,
                    record.used_at,
                    record.organisation_category,
                    record.closed_at,
                    record.closed_because,
                ),
            )
        return None

    async def open_invite(self, node_id: str, now: float) -> InviteRecord | None:
        """The newest unused, unexpired invite for ``node_id``, if any."""
        async with self._db.read("open_invite") as db:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {_INVITE_COLUMNS} FROM invites"
                    " WHERE node_id = ? AND used_at IS NULL AND expires_at > ?"
                    " ORDER BY created_at DESC LIMIT 1",
                    (node_id, now),
                )
            )
        return InviteRecord(*rows[0]) if rows else None

    async def get_invite(self, secret_hash: bytes) -> InviteRecord | None:
        rows = await self._db.fetch(
            f"SELECT {_INVITE_COLUMNS} FROM invites WHERE secret_hash = ?", (secret_hash,)
        )
        return InviteRecord(*rows[0]) if rows else None

    async def redeem_invite(
        self, secret_hash: bytes, certificate: CertificateRecord, now: float
    ) -> bool:
        """Use the invite and record the certificate in one transaction.

        False (and nothing written) when the invite is gone, used or expired
        by now: the single-use rule holds even for two joins at once.
        """
        async with self._db.transaction("redeem_invite") as db:
            cursor = await db.execute(_REDEEM, (now, secret_hash, now))
            if cursor.rowcount != 1:
                return False
            await db.execute(
                "INSERT INTO certificates (serial, node_id, organisation_id, issued_at, not_after)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    certificate.serial,
                    certificate.node_id,
                    certificate.organisation_id,
                    certificate.issued_at,
                    certificate.not_after,
                ),
            )
        return True

    async def revoke_organisation(
        self, organisation_id: str, now: float
    ) -> tuple[int, list[RevocationRecord]]:
        """Revoke the organisation's live certificates and drop its nodes, atomically.

        A revoked node leaves the directory and the index with its
        certificate: no search should be sent to a node every peer refuses.
        Returns (certificates the organisation ever had, revocations made now).
        """
        async with self._db.transaction("revoke_organisation") as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT c.serial, c.node_id, r.serial IS NOT NULL FROM certificates AS c"
                    " LEFT JOIN revocations AS r ON r.serial = c.serial"
                    " WHERE c.organisation_id = ? ORDER BY c.issued_at",
                    (organisation_id,),
                )
            )
            revoked = [
                RevocationRecord(serial, node_id, organisation_id, now)
                for serial, node_id, done in rows
                if not done
            ]
            await db.executemany(
                f"INSERT INTO revocations ({_REVOCATION_COLUMNS}) VALUES (?, ?, ?, ?)",
                [(r.serial, r.node_id, r.organisation_id, r.revoked_at) for r in revoked],
            )
            gone = [(node_id,) for node_id in sorted({r.node_id for r in revoked})]
            await db.executemany("DELETE FROM index_entries WHERE node_id = ?", gone)
            await db.executemany("DELETE FROM nodes WHERE node_id = ?", gone)
        return len(rows), revoked

    async def close_invite(self, secret_hash: bytes, now: float) -> bool:
        """End one unused invite now (it is being replaced); False if used or ended already."""
        async with self._db.transaction("close_invite") as db:
            cursor = await db.execute(
                "UPDATE invites SET expires_at = :now, closed_at = :now, closed_because = :why "
                "WHERE secret_hash = :hash AND used_at IS NULL AND expires_at > :now",
                {"now": now, "why": CLOSED_REPLACED, "hash": secret_hash},
            )
            return cursor.rowcount == 1

    async def close_open_invites(self, organisation_id: str, now: float) -> int:
        """End the organisation's unused, unexpired invites now (it is being revoked); how many."""
        async with self._db.transaction("close_open_invites") as db:
            cursor = await db.execute(
                "UPDATE invites SET expires_at = :now, closed_at = :now, closed_because = :why "
                "WHERE organisation_id = :org AND used_at IS NULL AND expires_at > :now",
                {"now": now, "why": CLOSED_REVOKED, "org": organisation_id},
            )
            return cursor.rowcount

    async def revoked_at(self, node_id: str) -> float | None:
        """When ``node_id`` was last revoked, or None (never, or invited again since)."""
        async with self._db.read("revoked_at") as db:
            rows = list(
                await db.execute_fetchall(
                    _REVOKED_AT, {"node_id": node_id, "revoked": CLOSED_REVOKED}
                )
            )
        return float(rows[0][0]) if rows else None

    async def membership(self) -> MembershipRows:
        """Who joined, who is invited and who registered, as one consistent read."""
        return await self._db.run("membership", _membership, write=False)

    async def revocations(self) -> list[RevocationRecord]:
        rows = await self._db.fetch(
            f"SELECT {_REVOCATION_COLUMNS} FROM revocations ORDER BY revoked_at, serial"
        )
        return [RevocationRecord(*row) for row in rows]
