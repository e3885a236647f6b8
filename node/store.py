"""The node's SQLite database: patients, resources, documents and the publish outbox.

The file is a ``transmural.database.Database``: one connection as the single
writer, every write one named ``BEGIN IMMEDIATE`` transaction, so the admin
CLI, writing the same file from another process, waits (``busy_timeout``)
instead of failing half-way. The schema is ``node.migrations``; the
statements of a bundle write are ``node.bundle_writer``.

The read API is what the peer service needs and no more; rows come back as
``node.records`` dataclasses. Document authors are named when read
(through ``resource_identifiers``), so load order of bundles does not matter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite

from node.audit import AuditRecord, chain_within
from node.bundle_writer import outbox_rows, write_bundle
from node.consent import ConsentRecord
from node.fhir import parse_reference
from node.migrations import MIGRATIONS
from node.records import (
    BundleDraft,
    BundleWritten,
    DocumentRecord,
    IndexChange,
    PatientRecord,
    UserRecord,
)
from transmural.clock import Clock, SystemClock, utc_iso
from transmural.const import DOCUMENT_CHUNK_BYTES, FETCH_PIECE_BYTES
from transmural.database import Database, holds_a_database
from transmural.errors import ConfigError, InvalidInput, NotFound
from transmural.identifiers import Identifier

#: Most active consents one patient may have at this node.
MAX_ACTIVE_CONSENTS = 50
#: How long a write waits for another process's write lock before failing.
BUSY_TIMEOUT_MS = 10_000
#: Chunks read per query while streaming a document (bounds memory per fetch).
CHUNKS_PER_READ = FETCH_PIECE_BYTES // DOCUMENT_CHUNK_BYTES
#: ``DocumentRecord`` fields, in the column order of ``_DOCUMENT_SELECT``.
_DOCUMENT_RECORD_FIELDS = [field.name for field in dataclasses.fields(DocumentRecord)]
_PATIENT_COLUMNS = (
    "patient_key, fhir_id, id_system, id_value, pseudonym, family, given, birth_date, "
    "exchange_consent"
)
_DOCUMENT_SELECT = """
SELECT d.document_id, d.patient_key, d.title, d.type_system, d.type_code, d.type_display,
       d.content_type, d.size, d.sha256, d.created,
       COALESCE(
         (SELECT r.label FROM resources r
           WHERE r.resource_type = d.author_type AND r.fhir_id = d.author_id),
         (SELECT r.label FROM resource_identifiers i
            JOIN resources r ON r.resource_type = i.resource_type AND r.fhir_id = i.fhir_id
           WHERE i.resource_type = d.author_type AND i.system = d.author_system
             AND i.value = d.author_value AND r.label IS NOT NULL
           ORDER BY r.resource_key LIMIT 1),
         d.author_display),
       d.categories
  FROM documents d
"""


class NodeStore:
    """The node's database behind a narrow async API (see module doc)."""

    def __init__(self, db: Database, clock: Clock) -> None:
        """Wrap an open database; use ``NodeStore.open`` to get one ready."""
        self._db = db
        self._clock = clock

    @classmethod
    async def open(
        cls,
        path: Path | str,
        clock: Clock | None = None,
        *,
        existing: bool = False,
        node: tuple[str, str] | None = None,
    ) -> NodeStore:
        """Open (creating if needed) and migrate the database; ConfigError if unusable.

        ``existing``: the node's database must be there already (an admin
        command reading or changing it must not make an empty one and then
        say the patient is unknown). ``node`` (node id, organisation id):
        the database must be this node's (``bind``); every command given a
        node's config passes it, so none reads or changes another's records.
        """
        if existing and not await asyncio.to_thread(holds_a_database, Path(path)):
            raise ConfigError(
                f"no node database at {path}: is the config the right node's, "
                "and has the node joined?"
            )
        clock = clock or SystemClock()
        db = await Database.open(
            path, MIGRATIONS, clock, owner="node", busy_timeout_ms=BUSY_TIMEOUT_MS
        )
        store = cls(db, clock)
        if node is not None:
            try:
                await store.bind(*node)
            except BaseException:
                await store.close()
                raise
        return store

    async def close(self) -> None:
        await self._db.close()

    async def bind(self, node_id: str, organisation_id: str) -> None:
        """Tie the database to this node, or ConfigError when it is another node's.

        The first node to serve or ingest with it owns it from then on.
        """
        async with self._db.transaction("bind") as db:
            rows = list(
                await db.execute_fetchall("SELECT node_id, organisation_id FROM node_identity")
            )
            if not rows:
                await db.execute(
                    "INSERT INTO node_identity (only_row, node_id, organisation_id, bound_at)"
                    " VALUES (1, ?, ?, ?)",
                    (node_id, organisation_id, self._now()),
                )
                return
        owner, organisation = rows[0]
        if owner != node_id:
            raise ConfigError(
                f"the database {self._db.path} belongs to node {owner} ({organisation}), not "
                f"{node_id}: point `database` in node.toml at this node's own file"
            )

    def _now(self) -> str:
        return utc_iso(self._clock.now())

    # --- patients ---

    async def patient_by_pseudonym(self, pseudonym: bytes) -> PatientRecord | None:
        rows = await self._db.fetch(_PATIENT_BY_PSEUDONYM, (pseudonym,))
        return _patient(rows[0]) if rows else None

    async def patient_and_consents(
        self, pseudonym: bytes
    ) -> tuple[PatientRecord | None, list[ConsentRecord]]:
        """The patient with ``pseudonym`` and their consents, in one trip to the database.

        What every peer's question needs first; one hop instead of two is a
        tenth of a millisecond on each of the many answers a node gives.
        """
        return await self._db.run(
            "patient_and_consents", partial(_read_patient_and_consents, pseudonym), write=False
        )

    async def patient_by_identifier(self, identifier: Identifier) -> PatientRecord | None:
        """The patient with this (canonical) identifier, national or any other."""
        rows = await self._db.fetch(
            f"SELECT {_PATIENT_COLUMNS} FROM patients WHERE id_system = ? AND id_value = ? "
            f"UNION ALL SELECT {_prefixed('p', _PATIENT_COLUMNS)} FROM patient_identifiers i "
            "JOIN patients p ON p.patient_key = i.patient_key WHERE i.system = ? AND i.value = ? "
            "LIMIT 1",
            (identifier.system, identifier.value, identifier.system, identifier.value),
        )
        return _patient(rows[0]) if rows else None

    async def patients(self) -> list[PatientRecord]:
        rows = await self._db.fetch(f"SELECT {_PATIENT_COLUMNS} FROM patients ORDER BY patient_key")
        return [_patient(row) for row in rows]

    async def set_exchange_consent(self, patient_key: int, allowed: bool) -> None:
        """The yes/no stand-in for the real consent model; NotFound for an unknown key."""
        async with self._db.transaction("set_exchange_consent") as db:
            cursor = await db.execute(
                "UPDATE patients SET exchange_consent = ?, updated_at = ? WHERE patient_key = ?",
                (int(allowed), self._now(), patient_key),
            )
            if cursor.rowcount == 0:
                raise NotFound(f"no patient with key {patient_key} at this node")

    async def assign_pseudonyms(self, pseudonym_of: Callable[[Identifier], bytes]) -> int:
        """(Re)compute every patient's pseudonym, queueing the changes to publish.

        For data ingested before the node had a network key, or after the key
        changed. Returns how many pseudonyms changed.
        """
        async with self._db.transaction("assign_pseudonyms") as db:
            rows = await db.execute_fetchall(
                "SELECT patient_key, id_system, id_value, pseudonym FROM patients "
                "WHERE id_value IS NOT NULL"
            )
            updates: list[tuple[bytes, int]] = []
            outbox: list[tuple[bytes, int]] = []
            for key, system, value, old in rows:
                new = pseudonym_of(Identifier(system, value))
                if new != old:
                    updates.append((new, key))
                    outbox.extend(outbox_rows(old, new))
            await db.executemany("UPDATE patients SET pseudonym = ? WHERE patient_key = ?", updates)
            await db.executemany(
                "INSERT INTO index_outbox (pseudonym, withdrawn) VALUES (?, ?)", outbox
            )
            return len(updates)

    # --- documents ---

    async def documents_of(self, patient_key: int) -> list[DocumentRecord]:
        """The patient's documents, newest first."""
        rows = await self._db.fetch(
            _DOCUMENT_SELECT + " WHERE d.patient_key = ? ORDER BY d.created DESC, d.document_id",
            (patient_key,),
        )
        return [_document(row) for row in rows]

    async def document(self, patient_key: int, document_id: str) -> DocumentRecord | None:
        """One document, or None when it is not this patient's."""
        rows = await self._db.fetch(
            _DOCUMENT_SELECT + " WHERE d.document_id = ? AND d.patient_key = ?",
            (document_id, patient_key),
        )
        return _document(rows[0]) if rows else None

    async def document_chunks(self, document_id: str) -> AsyncIterator[bytes]:
        """The content in stored chunks, a few per query: never all in memory."""
        after = -1
        while True:
            rows = await self._db.fetch(
                "SELECT seq, data FROM document_chunks WHERE document_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (document_id, after, CHUNKS_PER_READ),
            )
            for _, data in rows:
                yield bytes(data)
            if len(rows) < CHUNKS_PER_READ:
                return
            after = rows[-1][0]

    async def document_pieces(self, document_id: str) -> AsyncIterator[bytes]:
        """The content in pieces of at most FETCH_PIECE_BYTES, as a fetch sends it.

        One query's chunks joined into one piece: a 100 MB document is 400
        messages on the wire, not 1,600.
        """
        piece: list[bytes] = []
        async for chunk in self.document_chunks(document_id):
            piece.append(chunk)
            if len(piece) == CHUNKS_PER_READ:
                yield b"".join(piece)
                piece = []
        if piece:
            yield b"".join(piece)

    async def document_count(self) -> int:
        return await self._count("documents")

    # --- resources ---

    async def resource_count(self) -> int:
        return await self._count("resources")

    async def resources_of(
        self, patient_key: int, resource_types: Sequence[str]
    ) -> list[dict[str, Any]]:
        """The patient's stored resources of these types, as stored (references as Type/id).

        A long record is thousands of resources: the JSON is parsed in a worker
        thread so the event loop keeps serving other peers meanwhile.
        """
        if not resource_types:
            return []
        marks = ", ".join("?" * len(resource_types))
        rows = await self._db.fetch(
            f"SELECT json FROM resources WHERE patient_key = ? AND resource_type IN ({marks}) "
            "ORDER BY resource_key",
            (patient_key, *resource_types),
        )
        texts = [row[0] for row in rows]
        return await asyncio.to_thread(lambda: [json.loads(text) for text in texts])

    async def resolve(self, reference: str) -> dict[str, Any] | None:
        """The resource a literal or conditional reference points at, if stored."""
        target = parse_reference(reference)
        if target is None:
            return None
        if target.conditional:
            rows = await self._db.fetch(
                "SELECT r.json FROM resource_identifiers i JOIN resources r "
                "ON r.resource_type = i.resource_type AND r.fhir_id = i.fhir_id "
                "WHERE i.resource_type = ? AND i.system = ? AND i.value = ? "
                "ORDER BY r.resource_key LIMIT 1",
                (target.resource_type, target.system, target.value),
            )
        else:
            rows = await self._db.fetch(
                "SELECT json FROM resources WHERE resource_type = ? AND fhir_id = ?",
                (target.resource_type, target.fhir_id),
            )
        return json.loads(rows[0][0]) if rows else None

    # --- index outbox ---

    async def pending_index_changes(self, limit: int) -> list[IndexChange]:
        rows = await self._db.fetch(
            "SELECT seq, pseudonym, withdrawn FROM index_outbox ORDER BY seq LIMIT ?", (limit,)
        )
        return [
            IndexChange(seq, bytes(pseudonym), bool(withdrawn))
            for seq, pseudonym, withdrawn in rows
        ]

    async def mark_index_changes_sent(self, up_to_seq: int) -> None:
        """Drop every change up to ``up_to_seq``: the registry has them."""
        async with self._db.transaction("mark_index_changes_sent") as db:
            await db.execute("DELETE FROM index_outbox WHERE seq <= ?", (up_to_seq,))

    async def pending_index_count(self) -> int:
        return await self._count("index_outbox")

    async def request_time_bound_checks(self) -> int:
        """Queue every patient with an active consent that starts or ends in time.

        Their listing can change with no one touching them; the publisher
        calls this every LISTING_SWEEP_S. Returns how many were queued.
        """
        async with self._db.transaction("request_time_bound_checks") as db:
            cursor = await db.execute(
                "INSERT INTO index_outbox (pseudonym, withdrawn) "
                "SELECT p.pseudonym, 0 FROM patients p WHERE p.pseudonym IS NOT NULL "
                "AND p.patient_key IN (SELECT patient_key FROM consents WHERE status = 'active' "
                "AND (period_end IS NOT NULL OR period_start > ?))",
                (utc_iso(self._clock.now() - 86400)[:10],),
            )
            return cursor.rowcount

    async def request_full_relisting(self) -> int:
        """Queue every patient for the publisher to list or unlist anew; returns how many.

        For a registry that has dropped this node's index entries (it was
        revoked and has re-joined): the listing is rebuilt from consent.
        """
        async with self._db.transaction("request_full_relisting") as db:
            cursor = await db.execute(
                "INSERT INTO index_outbox (pseudonym, withdrawn) "
                "SELECT pseudonym, 0 FROM patients WHERE pseudonym IS NOT NULL"
            )
            return cursor.rowcount

    async def request_index_check(self, patient_key: int) -> None:
        """Queue the patient's pseudonym for the publisher to list or unlist anew.

        The publisher decides from the patient's consent at send time
        (``node.listing``); a patient without a pseudonym is not listed anyway.
        """
        async with self._db.transaction("request_index_check") as db:
            await _queue_index_check(db, patient_key)

    async def _count(self, table: str) -> int:
        rows = await self._db.fetch(f"SELECT COUNT(*) FROM {table}")
        return int(rows[0][0])

    # --- ingest ---

    # --- revocations ---

    async def revoked_serials(self) -> set[str]:
        rows = await self._db.fetch("SELECT serial FROM revoked_certificates")
        return {row[0] for row in rows}

    async def replace_revoked_serials(self, serials: set[str]) -> None:
        """Keep exactly ``serials`` (the registry's current list)."""
        now = self._now()
        async with self._db.transaction("replace_revoked_serials") as db:
            await db.execute("DELETE FROM revoked_certificates")
            await db.executemany(
                "INSERT INTO revoked_certificates (serial, recorded_at) VALUES (?, ?)",
                [(serial, now) for serial in sorted(serials)],
            )

    # --- clinicians ---

    async def put_user(self, user: UserRecord, token_hash: bytes) -> None:
        """Add a clinician, or replace one (with a new token) by the same id."""
        async with self._db.transaction("put_user") as db:
            await db.execute(
                "INSERT INTO users (user_id, display_name, role, token_hash, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET "
                "display_name = excluded.display_name, role = excluded.role, "
                "token_hash = excluded.token_hash, created_at = excluded.created_at, "
                "expires_at = excluded.expires_at",
                (user.user_id, user.display_name, user.role, token_hash, self._now(),
                 user.expires_at),
            )  # fmt: skip

    async def users(self) -> list[UserRecord]:
        """Every clinician of this node, by id."""
        rows = await self._db.fetch(
            "SELECT user_id, display_name, role, expires_at FROM users ORDER BY user_id"
        )
        return [UserRecord(*row) for row in rows]

    async def remove_user(self, user_id: str) -> bool:
        """Remove a clinician (their token stops working at once); False if unknown."""
        async with self._db.transaction("remove_user") as db:
            cursor = await db.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
            return cursor.rowcount > 0

    async def user_by_token_hash(self, token_hash: bytes) -> UserRecord | None:
        rows = await self._db.fetch(
            "SELECT user_id, display_name, role, expires_at FROM users WHERE token_hash = ?",
            (token_hash,),
        )
        return UserRecord(*rows[0]) if rows else None

    async def write_bundle(self, bundle: BundleDraft) -> BundleWritten:
        """Write one validated bundle in one transaction: all of it or nothing."""
        async with self._db.transaction("write_bundle") as db:
            return await write_bundle(db, self._now(), bundle)

    # --- audit (node.audit) ---

    @property
    def database(self) -> Database:
        """The open database, for ``node.audit.AuditLog``.

        The log runs its own named transactions on this one connection, so an
        audit append queues behind the store's writes instead of racing them.
        """
        return self._db

    # --- consent (node.consent) ---

    async def add_consent(self, record: ConsentRecord) -> None:
        """Record one consent; NotFound for an unknown patient, InvalidInput for a taken id."""
        await self.add_consents([record])

    async def add_consents(
        self, records: Sequence[ConsentRecord], audit: Sequence[AuditRecord] = ()
    ) -> None:
        """Record consents in one transaction: all of them or (on any error) none.

        ``audit`` (stamped records) is chained onto the audit log in the same
        transaction, and each patient's listing is queued for re-evaluation:
        a consent is never stored without its audit record, nor the reverse.
        """
        async with self._db.transaction("add_consents") as db:
            await _insert_consents(db, records)
            for patient_key in {record.patient_key for record in records}:
                await _queue_index_check(db, patient_key)
            await chain_within(db, list(audit))

    async def consents_of(self, patient_key: int) -> list[ConsentRecord]:
        """The patient's consents, withdrawn ones included, in the order recorded here."""
        rows = await self._db.fetch(_CONSENTS_OF, (patient_key,))
        return [_consent(row) for row in rows]

    async def consent(self, consent_id: str) -> ConsentRecord | None:
        rows = await self._db.fetch(
            f"SELECT {_CONSENT_COLUMNS} FROM consents WHERE consent_id = ?", (consent_id,)
        )
        return _consent(rows[0]) if rows else None

    async def all_consents(self) -> list[ConsentRecord]:
        """Every consent at this node, by patient (for the publisher's full pass)."""
        rows = await self._db.fetch(
            f"SELECT {_CONSENT_COLUMNS} FROM consents ORDER BY patient_key, rowid"
        )
        return [_consent(row) for row in rows]

    async def withdraw_consent(
        self,
        consent_id: str,
        when: str | None = None,
        audit: Callable[[ConsentRecord], AuditRecord] | None = None,
    ) -> ConsentRecord:
        """Mark a consent withdrawn (it stays, for the record) and return it as it now is.

        NotFound for an unknown id; InvalidInput when it was withdrawn before.
        ``when`` (a FHIR dateTime) defaults to now. ``audit`` makes the
        (stamped) audit record of the withdrawn consent, chained in the same
        transaction, which also queues the patient's listing.
        """
        when = when or self._now()
        async with self._db.transaction("withdraw_consent") as db:
            rows = await db.execute_fetchall(
                f"SELECT {_CONSENT_COLUMNS} FROM consents WHERE consent_id = ?", (consent_id,)
            )
            if not rows:
                raise NotFound(f"no consent {consent_id} at this node")
            record = _consent(next(iter(rows)))
            if record.status == "withdrawn":
                raise InvalidInput(f"consent {consent_id} was withdrawn at {record.withdrawn_at}")
            withdrawn = dataclasses.replace(record, status="withdrawn", withdrawn_at=when)
            await db.execute(
                "UPDATE consents SET status = 'withdrawn', withdrawn_at = ? WHERE consent_id = ?",
                (when, consent_id),
            )
            if audit is not None:
                await _queue_index_check(db, record.patient_key)
                await chain_within(db, [audit(withdrawn)])
            return withdrawn


async def _insert_consents(db: aiosqlite.Connection, records: Sequence[ConsentRecord]) -> None:
    """Insert consents, refusing an unknown patient, a full patient or a taken id."""
    for record in records:
        known = await db.execute_fetchall(
            "SELECT 1 FROM patients WHERE patient_key = ?", (record.patient_key,)
        )
        if not known:
            raise NotFound(f"no patient with key {record.patient_key} at this node")
        held = list(
            await db.execute_fetchall(
                "SELECT COUNT(*) FROM consents WHERE patient_key = ? AND status = 'active'",
                (record.patient_key,),
            )
        )
        if held[0][0] >= MAX_ACTIVE_CONSENTS:
            # Every decision reads them all: a flood would slow every answer.
            raise InvalidInput(
                f"a patient has at most {MAX_ACTIVE_CONSENTS} active consents here; "
                "withdraw some first"
            )
        taken = await db.execute_fetchall(
            "SELECT 1 FROM consents WHERE consent_id = ?", (record.consent_id,)
        )
        if taken:
            raise InvalidInput(f"consent {record.consent_id} is already recorded here")
        await db.execute(
            f"INSERT INTO consents ({_CONSENT_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _consent_row(record),
        )


async def _queue_index_check(db: aiosqlite.Connection, patient_key: int) -> None:
    await db.execute(
        "INSERT INTO index_outbox (pseudonym, withdrawn) SELECT pseudonym, 0 "
        "FROM patients WHERE patient_key = ? AND pseudonym IS NOT NULL",
        (patient_key,),
    )


def _prefixed(alias: str, columns: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in columns.split(","))


def _read_patient_and_consents(
    pseudonym: bytes, db: sqlite3.Connection
) -> tuple[PatientRecord | None, list[ConsentRecord]]:
    rows = db.execute(_PATIENT_BY_PSEUDONYM, (pseudonym,)).fetchall()
    if not rows:
        return None, []
    patient = _patient(rows[0])
    consents = db.execute(_CONSENTS_OF, (patient.patient_key,)).fetchall()
    return patient, [_consent(row) for row in consents]


def _patient(row: sqlite3.Row) -> PatientRecord:
    key, fhir_id, system, value, pseudonym, family, given, birth_date, consent = row
    return PatientRecord(
        patient_key=key,
        fhir_id=fhir_id,
        identifier=Identifier(system, value) if value is not None else None,
        pseudonym=bytes(pseudonym) if pseudonym is not None else None,
        family=family,
        given=given,
        birth_date=birth_date,
        exchange_consent=bool(consent),
    )


def _document(row: sqlite3.Row) -> DocumentRecord:
    fields = dict(zip(_DOCUMENT_RECORD_FIELDS, row, strict=True))
    fields["categories"] = frozenset(str(fields["categories"] or "").split())
    return DocumentRecord(**fields)


_CONSENT_COLUMNS = (
    "consent_id, patient_key, decision, actor_kind, actor, data, period_start, period_end, "
    "recorded_by, recorded_via, recorded_at, status, withdrawn_at"
)
_PATIENT_BY_PSEUDONYM = (
    f"SELECT {_PATIENT_COLUMNS} FROM patients WHERE pseudonym = ? ORDER BY patient_key LIMIT 1"
)
_CONSENTS_OF = f"SELECT {_CONSENT_COLUMNS} FROM consents WHERE patient_key = ? ORDER BY rowid"


def _consent_row(record: ConsentRecord) -> tuple[object, ...]:
    data = " ".join(sorted(record.data))
    return (
        record.consent_id, record.patient_key, record.decision, record.actor_kind, record.actor,
        data, record.period_start, record.period_end, record.recorded_by, record.recorded_via,
        record.recorded_at, record.status, record.withdrawn_at,
    )  # fmt: skip


def _consent(row: sqlite3.Row) -> ConsentRecord:
    """A stored consent; validated again, so a hand-edited row cannot slip through."""
    (consent_id, patient_key, decision, actor_kind, actor, data, period_start, period_end,
     recorded_by, recorded_via, recorded_at, status, withdrawn_at) = row  # fmt: skip
    return ConsentRecord(
        consent_id=consent_id, patient_key=patient_key, decision=decision,
        actor_kind=actor_kind, actor=actor, data=frozenset(data.split()),
        period_start=period_start, period_end=period_end, recorded_by=recorded_by,
        recorded_via=recorded_via, recorded_at=recorded_at, status=status,
        withdrawn_at=withdrawn_at,
    )  # fmt: skip
