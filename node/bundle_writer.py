"""The statements of one ``NodeStore.write_bundle`` transaction, in order.

``ifNoneExist`` entries whose identifier another resource already holds are
dropped first; then each patient is upserted (by FHIR id, else by national
identifier) with its pseudonym changes queued in the outbox; then the
resources and documents, whose patients may come from this bundle or an
earlier one. Whatever is left out is named in ``BundleWritten.skipped``.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterable
from typing import Any

import aiosqlite

from node.records import (
    BundleDraft,
    BundleWritten,
    DocumentDraft,
    PatientDraft,
    ResourceDraft,
)
from transmural.const import DOCUMENT_CHUNK_BYTES
from transmural.errors import InvalidBundle
from transmural.identifiers import Identifier

#: Most parameters bound in one ``IN (...)`` list.
_MAX_IN = 500

_DOCUMENT_DRAFT_FIELDS = (
    "document_id", "source", "title", "type_system", "type_code", "type_display",
    "content_type", "size", "sha256", "created",
)  # fmt: skip
#: Columns of a documents row in ``_document_row`` order.
_DOCUMENT_WRITE_COLUMNS = (
    *_DOCUMENT_DRAFT_FIELDS, "patient_key", "author_type", "author_id", "author_system",
    "author_value", "author_display", "updated_at", "categories",
)  # fmt: skip


async def write_bundle(db: aiosqlite.Connection, now: str, bundle: BundleDraft) -> BundleWritten:
    """Write ``bundle`` on ``db``; call inside one ``BEGIN IMMEDIATE`` transaction."""
    return await _BundleWriter(db, now, bundle).write()


def outbox_rows(old: bytes | None, new: bytes | None) -> list[tuple[bytes, int]]:
    """Publish a new pseudonym, withdraw a replaced one."""
    if old == new:
        return []
    rows: list[tuple[bytes, int]] = []
    if old is not None:
        rows.append((old, 1))
    if new is not None:
        rows.append((new, 0))
    return rows


class _BundleWriter:
    """The statements of one ``write_bundle`` transaction, in order."""

    def __init__(self, db: aiosqlite.Connection, now: str, bundle: BundleDraft) -> None:
        self._db = db
        self._now = now
        self._bundle = bundle
        self._skipped = list(bundle.skipped)
        self._keys: dict[str, int] = {}
        self._new_patients = 0
        self._kept_identifiers = 0

    async def write(self) -> BundleWritten:
        resources = await self._conditional_creates(self._bundle.resources)
        published = unpublished = 0
        unindexed: set[int] = set()
        for patient in self._bundle.patients:
            pseudonym, outbox = await self._upsert_patient(patient)
            published += sum(1 for _, withdrawn in outbox if not withdrawn)
            unpublished += pseudonym is None
            if pseudonym is None:
                unindexed.add(self._keys[patient.fhir_id])
        patient_keys = frozenset(self._keys.values())
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
            new_patients=self._new_patients,
            patient_keys=patient_keys,
            unindexed_keys=frozenset(unindexed),
            kept_identifiers=self._kept_identifiers,
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

    def _keep_identifier(self, patient: PatientDraft, existing: sqlite3.Row) -> PatientDraft:
        """A bundle without the national identifier this node knows the patient by.

        Absent is not "withdrawn": an export that leaves the BSN out must not
        take the patient out of the index, hiding every record here from the
        network. The known identifier and pseudonym are kept (and counted, so
        the admin hears of it); a different identifier still replaces it.
        """
        self._kept_identifiers += 1
        known = Identifier(existing[1], existing[2])
        return dataclasses.replace(
            patient,
            identifier=known,
            pseudonym=None if existing[3] is None else bytes(existing[3]),
            identifiers=tuple(dict.fromkeys(((known.system, known.value), *patient.identifiers))),
        )

    async def _upsert_patient(
        self, patient: PatientDraft
    ) -> tuple[bytes | None, list[tuple[bytes, int]]]:
        """Insert or update one patient; returns its pseudonym and its outbox rows."""
        existing = await self._find_patient(patient)
        if patient.identifier is None and existing is not None and existing[1] is not None:
            patient = self._keep_identifier(patient, existing)
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
                self._new_patients += 1
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
        outbox = outbox_rows(old[1] if old else None, pseudonym)
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
        " ".join(sorted(d.categories)),
    )


def _upsert(table: str, keys: tuple[str, ...], columns: tuple[str, ...]) -> str:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE`` every other column."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
    )
