"""The node's SQLite database: patients, resources, documents and the publish outbox.

One aiosqlite connection is the single writer (its worker thread runs calls
in order). An ``asyncio.Lock`` keeps a transaction's statements together so
no other call lands between them; every write is one named ``BEGIN
IMMEDIATE`` transaction, so it takes the write lock at its start and the
admin CLI, writing the same file from another process, waits
(``busy_timeout``) instead of failing half-way. WAL lets that process read
while we write.

The read API is what the peer service needs and no more; rows come back as
``node.records`` dataclasses. Document authors are named when read
(through ``resource_identifiers``), so load order of bundles does not matter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from node.fhir import parse_reference
from node.migrations import migrate
from node.records import (
    BundleDraft,
    BundleWritten,
    DocumentDraft,
    DocumentRecord,
    IndexChange,
    PatientDraft,
    PatientRecord,
    ResourceDraft,
)
from transmural.clock import Clock, SystemClock, utc_iso
from transmural.const import DOCUMENT_CHUNK_BYTES
from transmural.errors import ConfigError, InvalidBundle, NotFound
from transmural.identifiers import Identifier

log = logging.getLogger(__name__)

#: How long a write waits for another process's write lock before failing.
BUSY_TIMEOUT_MS = 10_000
#: Chunks read per query while streaming a document (bounds memory per fetch).
CHUNKS_PER_READ = 4
#: Most parameters bound in one ``IN (...)`` list.
_MAX_IN = 500

_DOCUMENT_DRAFT_FIELDS = (
    "document_id", "source", "title", "type_system", "type_code", "type_display",
    "content_type", "size", "sha256", "created",
)  # fmt: skip
#: Columns of a documents row in ``_document_row`` order.
_DOCUMENT_WRITE_COLUMNS = (
    *_DOCUMENT_DRAFT_FIELDS, "patient_key", "author_type", "author_id", "author_system",
    "author_value", "author_display", "updated_at",
)  # fmt: skip
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
         d.author_display)
  FROM documents d
"""


class NodeStore:
    """The node's database behind a narrow async API (see module doc)."""

    def __init__(self, db: aiosqlite.Connection, clock: Clock) -> None:
        self._db = db
        self._clock = clock
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str, clock: Clock | None = None) -> NodeStore:
        """Open (creating if needed) and migrate the database at ``path``."""
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as error:
            raise ConfigError(f"cannot open the node database {path}: {error}") from None
        try:
            await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.execute("PRAGMA foreign_keys = ON")
            store = cls(db, clock or SystemClock())
            await store._migrate()
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    # --- plumbing ---

    @asynccontextmanager
    async def _transaction(self, name: str) -> AsyncIterator[aiosqlite.Connection]:
        """One named write transaction; rolled back on any exception."""
        async with self._lock:
            started = self._clock.monotonic()
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                await self._db.execute("ROLLBACK")
                log.debug("transaction %s rolled back", name)
                raise
            await self._db.execute("COMMIT")
            log.debug("transaction %s: %.1f ms", name, (self._clock.monotonic() - started) * 1e3)

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            return list(await self._db.execute_fetchall(sql, params))

    async def _migrate(self) -> None:
        async with self._transaction("migrate") as db:
            await migrate(db, self._now())

    def _now(self) -> str:
        return utc_iso(self._clock.now())

    # --- patients ---

    async def patient_by_pseudonym(self, pseudonym: bytes) -> PatientRecord | None:
        rows = await self._fetch(
            f"SELECT {_PATIENT_COLUMNS} FROM patients WHERE pseudonym = ? "
            "ORDER BY patient_key LIMIT 1",
            (pseudonym,),
        )
        return _patient(rows[0]) if rows else None

    async def patient_by_identifier(self, identifier: Identifier) -> PatientRecord | None:
        """The patient with this (canonical) identifier, national or any other."""
        rows = await self._fetch(
            f"SELECT {_PATIENT_COLUMNS} FROM patients WHERE id_system = ? AND id_value = ? "
            f"UNION ALL SELECT {_prefixed('p', _PATIENT_COLUMNS)} FROM patient_identifiers i "
            "JOIN patients p ON p.patient_key = i.patient_key WHERE i.system = ? AND i.value = ? "
            "LIMIT 1",
            (identifier.system, identifier.value, identifier.system, identifier.value),
        )
        return _patient(rows[0]) if rows else None

    async def patients(self) -> list[PatientRecord]:
        rows = await self._fetch(f"SELECT {_PATIENT_COLUMNS} FROM patients ORDER BY patient_key")
        return [_patient(row) for row in rows]

    async def set_exchange_consent(self, patient_key: int, allowed: bool) -> None:
        """The yes/no stand-in for the real consent model; NotFound for an unknown key."""
        async with self._transaction("set_exchange_consent") as db:
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
        async with self._transaction("assign_pseudonyms") as db:
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
                    outbox.extend(_outbox_rows(old, new))
            await db.executemany("UPDATE patients SET pseudonym = ? WHERE patient_key = ?", updates)
            await db.executemany(
                "INSERT INTO index_outbox (pseudonym, withdrawn) VALUES (?, ?)", outbox
            )
            return len(updates)

    # --- documents ---

    async def documents_of(self, patient_key: int) -> list[DocumentRecord]:
        """The patient's documents, newest first."""
        rows = await self._fetch(
            _DOCUMENT_SELECT + " WHERE d.patient_key = ? ORDER BY d.created DESC, d.document_id",
            (patient_key,),
        )
        return [_document(row) for row in rows]

    async def document(self, patient_key: int, document_id: str) -> DocumentRecord | None:
        """One document, or None when it is not this patient's."""
        rows = await self._fetch(
            _DOCUMENT_SELECT + " WHERE d.document_id = ? AND d.patient_key = ?",
            (document_id, patient_key),
        )
        return _document(rows[0]) if rows else None

    async def document_chunks(self, document_id: str) -> AsyncIterator[bytes]:
        """The content in stored chunks, a few per query: never all in memory."""
        after = -1
        while True:
            rows = await self._fetch(
                "SELECT seq, data FROM document_chunks WHERE document_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (document_id, after, CHUNKS_PER_READ),
            )
            for _, data in rows:
                yield bytes(data)
            if len(rows) < CHUNKS_PER_READ:
                return
            after = rows[-1][0]

    async def document_count(self) -> int:
        return await self._count("documents")

    # --- resources ---

    async def resource_count(self) -> int:
        return await self._count("resources")

    async def resolve(self, reference: str) -> dict[str, Any] | None:
        """The resource a literal or conditional reference points at, if stored."""
        target = parse_reference(reference)
        if target is None:
            return None
        if target.conditional:
            rows = await self._fetch(
                "SELECT r.json FROM resource_identifiers i JOIN resources r "
                "ON r.resource_type = i.resource_type AND r.fhir_id = i.fhir_id "
                "WHERE i.resource_type = ? AND i.system = ? AND i.value = ? "
                "ORDER BY r.resource_key LIMIT 1",
                (target.resource_type, target.system, target.value),
            )
        else:
            rows = await self._fetch(
                "SELECT json FROM resources WHERE resource_type = ? AND fhir_id = ?",
                (target.resource_type, target.fhir_id),
            )
        return json.loads(rows[0][0]) if rows else None

    # --- index outbox ---

    async def pending_index_changes(self, limit: int) -> list[IndexChange]:
        rows = await self._fetch(
            "SELECT seq, pseudonym, withdrawn FROM index_outbox ORDER BY seq LIMIT ?", (limit,)
        )
        return [
            IndexChange(seq, bytes(pseudonym), bool(withdrawn))
            for seq, pseudonym, withdrawn in rows
        ]

    async def mark_index_changes_sent(self, up_to_seq: int) -> None:
        """Drop every change up to ``up_to_seq``: the registry has them."""
        async with self._transaction("mark_index_changes_sent") as db:
            await db.execute("DELETE FROM index_outbox WHERE seq <= ?", (up_to_seq,))

    async def pending_index_count(self) -> int:
        return await self._count("index_outbox")

    async def _count(self, table: str) -> int:
        rows = await self._fetch(f"SELECT COUNT(*) FROM {table}")
        return int(rows[0][0])

    # --- ingest ---

    async def write_bundle(self, bundle: BundleDraft) -> BundleWritten:
        """Write one validated bundle in one transaction: all of it or nothing."""
        async with self._transaction("write_bundle") as db:
            writer = _BundleWriter(db, self._now(), bundle)
            return await writer.write()


class _BundleWriter:
    """The statements of one ``write_bundle`` transaction, in order."""

    def __init__(self, db: aiosqlite.Connection, now: str, bundle: BundleDraft) -> None:
        self._db = db
        self._now = now
        self._bundle = bundle
        self._skipped = list(bundle.skipped)
        self._keys: dict[str, int] = {}

    async def write(self) -> BundleWritten:
        resources = await self._conditional_creates(self._bundle.resources)
        published = unpublished = 0
        for patient in self._bundle.patients:
            pseudonym, outbox = await self._upsert_patient(patient)
            published += sum(1 for _, withdrawn in outbox if not withdrawn)
            unpublished += pseudonym is None
        await self._patient_keys(r.patient_fhir_id for r in resources)
        await self._write_resources(resources)
        documents = await self._write_documents(self._bundle.documents)
        return BundleWritten(
            patients=len(self._bundle.patients),
            resources=len(resources),
            documents=documents,
            published=published,
            unpublished=unpublished,
            skipped=self._skipped,
        )

    async def _conditional_creates(self, resources: list[ResourceDraft]) -> list[ResourceDraft]:
        """Drop ``ifNoneExist`` entries whose identifier another resource already has."""
        wanted = {(r.resource_type, r.if_none_exist[0]) for r in resources if r.if_none_exist}
        holders: dict[tuple[str, str, str], str] = {}
        for resource_type, system in wanted:
            rows = await self._db.execute_fetchall(
                "SELECT value, fhir_id FROM resource_identifiers "
                "WHERE resource_type = ? AND system = ?",
                (resource_type, system),
            )
            for value, fhir_id in rows:
                holders.setdefault((resource_type, system, value), fhir_id)
        kept: list[ResourceDraft] = []
        for resource in resources:
            if resource.if_none_exist is not None:
                key = (resource.resource_type, *resource.if_none_exist)
                holder = holders.setdefault(key, resource.fhir_id)
                if holder != resource.fhir_id:
                    self._skipped.append(
                        f"{resource.resource_type}/{resource.fhir_id}: exists as "
                        f"{resource.resource_type}/{holder} (ifNoneExist)"
                    )
                    continue
            kept.append(resource)
        return kept

    def _pseudonym_after(
        self, patient: PatientDraft, old: tuple[Identifier, bytes] | None
    ) -> bytes | None:
        """The patient's pseudonym after this write (kept when no key was given)."""
        if self._bundle.pseudonymised or patient.identifier is None:
            return patient.pseudonym
        if old is not None and old[0] == patient.identifier:
            return old[1]
        return None

    async def _upsert_patient(
        self, patient: PatientDraft
    ) -> tuple[bytes | None, list[tuple[bytes, int]]]:
        """Insert or update one patient; returns its pseudonym and its outbox rows."""
        existing = await self._find_patient(patient)
        old = None
        if existing is not None and existing[3] is not None:
            old = (Identifier(existing[1], existing[2]), bytes(existing[3]))
        pseudonym = self._pseudonym_after(patient, old)
        system = patient.identifier.system if patient.identifier else None
        value = patient.identifier.value if patient.identifier else None
        fields = (
            system,
            value,
            pseudonym,
            patient.family,
            patient.given,
            patient.birth_date,
            patient.gender,
            self._now,
        )
        try:
            if existing is None:
                cursor = await self._db.execute(
                    "INSERT INTO patients (id_system, id_value, pseudonym, family, given, "
                    "birth_date, gender, updated_at, fhir_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*fields, patient.fhir_id),
                )
                key = cursor.lastrowid
                assert key is not None
            else:
                key = existing[0]
                await self._db.execute(
                    "UPDATE patients SET id_system = ?, id_value = ?, pseudonym = ?, family = ?, "
                    "given = ?, birth_date = ?, gender = ?, updated_at = ? WHERE patient_key = ?",
                    (*fields, key),
                )
        except sqlite3.IntegrityError:
            raise InvalidBundle(
                f"{self._bundle.file}: Patient/{patient.fhir_id}: its national identifier "
                "belongs to another patient of this node"
            ) from None
        self._keys[patient.fhir_id] = key
        await self._db.execute("DELETE FROM patient_identifiers WHERE patient_key = ?", (key,))
        await self._db.executemany(
            "INSERT OR IGNORE INTO patient_identifiers (patient_key, system, value) "
            "VALUES (?, ?, ?)",
            [(key, s, v) for s, v in patient.identifiers],
        )
        outbox = _outbox_rows(old[1] if old else None, pseudonym)
        await self._db.executemany(
            "INSERT INTO index_outbox (pseudonym, withdrawn) VALUES (?, ?)", outbox
        )
        return pseudonym, outbox

    async def _find_patient(self, patient: PatientDraft) -> sqlite3.Row | None:
        """By FHIR id (of any Patient resource merged into it), else by national identifier.

        Two Patient resources with one national identifier are one person to
        the network, so the second joins the first's key.
        """
        select = "SELECT p.patient_key, p.id_system, p.id_value, p.pseudonym FROM patients p"
        rows = list(
            await self._db.execute_fetchall(
                f"{select} WHERE p.fhir_id = ? UNION ALL {select} JOIN resources r "
                "ON r.patient_key = p.patient_key WHERE r.resource_type = 'Patient' "
                "AND r.fhir_id = ? LIMIT 1",
                (patient.fhir_id, patient.fhir_id),
            )
        )
        if not rows and patient.identifier is not None:
            rows = list(
                await self._db.execute_fetchall(
                    f"{select} WHERE p.id_system = ? AND p.id_value = ?",
                    (patient.identifier.system, patient.identifier.value),
                )
            )
        return rows[0] if rows else None

    async def _patient_keys(self, fhir_ids: Iterable[str | None]) -> None:
        """Keys of patients this bundle refers to but does not contain."""
        missing = sorted({f for f in fhir_ids if f is not None and f not in self._keys})
        for start in range(0, len(missing), _MAX_IN):
            batch = missing[start : start + _MAX_IN]
            rows = await self._db.execute_fetchall(
                "SELECT fhir_id, patient_key FROM resources WHERE resource_type = 'Patient' "
                f"AND patient_key IS NOT NULL AND fhir_id IN ({', '.join('?' * len(batch))})",
                batch,
            )
            self._keys.update((fhir_id, key) for fhir_id, key in rows)

    async def _write_resources(self, resources: list[ResourceDraft]) -> None:
        await self._db.executemany(
            "INSERT INTO resources (resource_type, fhir_id, patient_key, label, json, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (resource_type, fhir_id) DO UPDATE SET "
            "patient_key = COALESCE(excluded.patient_key, resources.patient_key), "
            "label = excluded.label, json = excluded.json, updated_at = excluded.updated_at",
            [
                (
                    r.resource_type,
                    r.fhir_id,
                    self._keys.get(r.patient_fhir_id) if r.patient_fhir_id else None,
                    r.label,
                    r.json,
                    self._now,
                )
                for r in resources
            ],
        )
        await self._db.executemany(
            "DELETE FROM resource_identifiers WHERE resource_type = ? AND fhir_id = ?",
            [(r.resource_type, r.fhir_id) for r in resources],
        )
        await self._db.executemany(
            "INSERT OR IGNORE INTO resource_identifiers (resource_type, fhir_id, system, value) "
            "VALUES (?, ?, ?, ?)",
            [(r.resource_type, r.fhir_id, s, v) for r in resources for s, v in r.identifiers],
        )

    async def _write_documents(self, documents: list[DocumentDraft]) -> int:
        rows = []
        for document in documents:
            key = self._keys.get(document.patient_fhir_id)
            if key is None:
                self._skipped.append(f"{document.source}: its patient is not stored here")
                continue
            rows.append((key, document))
        await self._db.executemany(
            _upsert("documents", ("document_id",), _DOCUMENT_WRITE_COLUMNS),
            [_document_row(key, d, self._now) for key, d in rows],
        )
        await self._db.executemany(
            "DELETE FROM document_chunks WHERE document_id = ?",
            [(d.document_id,) for _, d in rows],
        )
        await self._db.executemany(
            "INSERT INTO document_chunks (document_id, seq, data) VALUES (?, ?, ?)",
            (
                (d.document_id, seq, d.content[offset : offset + DOCUMENT_CHUNK_BYTES])
                for _, d in rows
                for seq, offset in enumerate(range(0, max(len(d.content), 1), DOCUMENT_CHUNK_BYTES))
            ),
        )
        return len(rows)


def _outbox_rows(old: bytes | None, new: bytes | None) -> list[tuple[bytes, int]]:
    """Publish a new pseudonym, withdraw a replaced one."""
    if old == new:
        return []
    rows: list[tuple[bytes, int]] = []
    if old is not None:
        rows.append((old, 1))
    if new is not None:
        rows.append((new, 0))
    return rows


def _document_row(key: int, d: DocumentDraft, now: str) -> tuple[Any, ...]:
    author = d.author
    return (
        *(getattr(d, name) for name in _DOCUMENT_DRAFT_FIELDS),
        key,
        author.resource_type,
        author.fhir_id or None,
        author.system or None,
        author.value or None,
        author.display,
        now,
    )


def _upsert(table: str, keys: tuple[str, ...], columns: tuple[str, ...]) -> str:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE`` every other column."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
    )


def _prefixed(alias: str, columns: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in columns.split(","))


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
    return DocumentRecord(**dict(zip(_DOCUMENT_RECORD_FIELDS, row, strict=True)))
