"""The node store on its own: schema, upserts, the outbox, chunked documents, consent."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.migrations import MIGRATIONS, statements
from node.records import (
    BundleDraft,
    DocumentDraft,
    IndexChange,
    OrganisationRef,
    PatientDraft,
    ResourceDraft,
)
from node.store import NodeStore
from transmural.const import DOCUMENT_CHUNK_BYTES, FETCH_PIECE_BYTES
from transmural.errors import ConfigError, InvalidBundle, NotFound
from transmural.identifiers import US_SSN_SYSTEM, Identifier, canonical
from transmural.pseudonym import Pseudonymiser

PSEUDONYMS = Pseudonymiser(b"store-test-network-key-of-32-bytes!")
ORG_SYSTEM = "https://github.com/synthetichealth/synthea"


def patient(fhir_id: str, ssn: str | None, family: str = "Doe") -> PatientDraft:
    identifier = canonical(US_SSN_SYSTEM, ssn) if ssn else None
    return PatientDraft(
        fhir_id=fhir_id,
        identifier=identifier,
        pseudonym=PSEUDONYMS.pseudonym(identifier) if identifier else None,
        family=family,
        given="Jane",
        birth_date="1970-01-01",
        gender="female",
        identifiers=(((identifier.system, identifier.value),) if identifier else ())
        + (("http://hospital.example/mrn", f"MRN-{fhir_id}"),),
    )


def resource(kind: str, fhir_id: str, owner: str | None, **extra: object) -> ResourceDraft:
    return ResourceDraft(
        resource_type=kind,
        fhir_id=fhir_id,
        patient_fhir_id=owner,
        json=f'{{"resourceType":"{kind}","id":"{fhir_id}"}}',
        label=extra.get("label"),  # type: ignore[arg-type]
        identifiers=extra.get("identifiers", ()),  # type: ignore[arg-type]
        if_none_exist=extra.get("if_none_exist"),  # type: ignore[arg-type]
    )


def document(
    document_id: str, owner: str, content: bytes, created: str, author: OrganisationRef
) -> DocumentDraft:
    return DocumentDraft(
        document_id=document_id,
        patient_fhir_id=owner,
        source=document_id,
        title=f"Title of {document_id}",
        type_system="http://loinc.org",
        type_code="34133-9",
        type_display="Summary of episode note",
        content_type="application/octet-stream",
        content=content,
        created=created,
        author=author,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
    )


def bundle(
    patients: list[PatientDraft],
    resources: list[ResourceDraft] | None = None,
    documents: list[DocumentDraft] | None = None,
    pseudonymised: bool = True,
) -> BundleDraft:
    return BundleDraft(
        file="test.json",
        patients=patients,
        resources=[resource("Patient", p.fhir_id, p.fhir_id) for p in patients] + (resources or []),
        documents=documents or [],
        skipped=[],
        pseudonymised=pseudonymised,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[NodeStore]:
    opened = await NodeStore.open(tmp_path / "node.db")
    yield opened
    await opened.close()


async def test_migrations_apply_once_and_reopen_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    for _ in range(3):
        store = await NodeStore.open(path)
        await store.close()
    with sqlite3.connect(path) as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_version")]
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_database_newer_than_the_software_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    await (await NodeStore.open(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (?, 'later')", (len(MIGRATIONS) + 1,))
    with pytest.raises(ConfigError, match="upgrade the software"):
        await NodeStore.open(path)


async def test_the_first_node_to_bind_the_database_owns_it(store: NodeStore) -> None:
    await store.bind("node-1", "URA-1")
    await store.bind("node-1", "URA-1")  # again: nothing to say
    with pytest.raises(ConfigError, match=r"belongs to node node-1 \(URA-1\), not node-2"):
        await store.bind("node-2", "URA-2")


def test_every_migration_splits_into_complete_statements() -> None:
    for script in MIGRATIONS:
        found = statements(script)
        assert found and all(sqlite3.complete_statement(s) for s in found)


async def test_upsert_by_type_and_id_adds_no_duplicates(store: NodeStore) -> None:
    draft = bundle([patient("p1", "999-11-1111")], [resource("Observation", "o1", "p1")])
    first = await store.write_bundle(draft)
    second = await store.write_bundle(draft)
    assert (first.resources, second.resources) == (2, 2)
    assert await store.resource_count() == 2
    assert len(await store.patients()) == 1
    assert await store.pending_index_count() == 1  # published once, not per write


async def test_patient_lookups(store: NodeStore) -> None:
    await store.write_bundle(bundle([patient("p1", "999-11-1111"), patient("p2", None)]))
    p1 = await store.patient_by_identifier(canonical(US_SSN_SYSTEM, "999111111"))
    assert p1 is not None and p1.fhir_id == "p1" and p1.identifier is not None
    assert p1.pseudonym == PSEUDONYMS.pseudonym(p1.identifier)
    assert await store.patient_by_pseudonym(p1.pseudonym) == p1
    by_mrn = await store.patient_by_identifier(Identifier("http://hospital.example/mrn", "MRN-p2"))
    assert by_mrn is not None and by_mrn.fhir_id == "p2" and by_mrn.pseudonym is None
    assert await store.patient_by_pseudonym(bytes(32)) is None
    assert [p.fhir_id for p in await store.patients()] == ["p1", "p2"]


async def test_outbox_is_drained_in_order(store: NodeStore) -> None:
    ssns = ["999-11-1111", "999-22-2222", "999-33-3333"]
    for index, ssn in enumerate(ssns):
        await store.write_bundle(bundle([patient(f"p{index}", ssn)]))
    changes = await store.pending_index_changes(10)
    assert [c.seq for c in changes] == sorted(c.seq for c in changes)
    expected = [PSEUDONYMS.pseudonym(canonical(US_SSN_SYSTEM, s)) for s in ssns]
    assert [c.pseudonym for c in changes] == expected
    assert not any(c.withdrawn for c in changes)
    assert await store.pending_index_changes(2) == changes[:2]
    await store.mark_index_changes_sent(changes[1].seq)
    assert await store.pending_index_changes(10) == changes[2:]
    await store.mark_index_changes_sent(changes[2].seq)
    assert await store.pending_index_count() == 0


async def test_a_changed_identifier_withdraws_the_old_pseudonym(store: NodeStore) -> None:
    await store.write_bundle(bundle([patient("p1", "999-11-1111")]))
    await store.mark_index_changes_sent(10**9)
    await store.write_bundle(bundle([patient("p1", "999-99-9999")]))
    old = PSEUDONYMS.pseudonym(canonical(US_SSN_SYSTEM, "999111111"))
    new = PSEUDONYMS.pseudonym(canonical(US_SSN_SYSTEM, "999999999"))
    changes = await store.pending_index_changes(10)
    assert [(c.pseudonym, c.withdrawn) for c in changes] == [(old, True), (new, False)]
    assert await store.patient_by_pseudonym(old) is None


async def test_a_second_patient_resource_with_the_same_identifier_joins_the_first(
    store: NodeStore,
) -> None:
    await store.write_bundle(bundle([patient("p1", "999-11-1111")]))
    await store.write_bundle(bundle([patient("p1-copy", "999 11 1111")]))
    assert len(await store.patients()) == 1
    assert await store.pending_index_count() == 1


async def test_a_taken_national_identifier_is_refused_and_nothing_is_written(
    store: NodeStore,
) -> None:
    await store.write_bundle(bundle([patient("p1", "999-11-1111"), patient("p2", "999-22-2222")]))
    before = (await store.resource_count(), await store.pending_index_count())
    clash = bundle([patient("p2", "999-11-1111")], [resource("Observation", "new", "p2")])
    with pytest.raises(InvalidBundle, match="belongs to another patient"):
        await store.write_bundle(clash)
    assert (await store.resource_count(), await store.pending_index_count()) == before


async def test_pseudonyms_assigned_after_ingest_without_a_key(store: NodeStore) -> None:
    unkeyed = patient("p1", "999-11-1111")
    unkeyed = dataclasses.replace(unkeyed, pseudonym=None)
    await store.write_bundle(bundle([unkeyed], pseudonymised=False))
    assert await store.pending_index_count() == 0
    assert await store.assign_pseudonyms(PSEUDONYMS.pseudonym) == 1
    assert await store.assign_pseudonyms(PSEUDONYMS.pseudonym) == 0
    changes = await store.pending_index_changes(10)
    assert changes == [
        IndexChange(
            changes[0].seq, PSEUDONYMS.pseudonym(canonical(US_SSN_SYSTEM, "999111111")), False
        )
    ]
    # Re-ingest without a key keeps the pseudonym it now has.
    await store.write_bundle(bundle([unkeyed], pseudonymised=False))
    assert (await store.patients())[0].pseudonym is not None


async def test_a_fetch_reads_a_document_in_pieces_of_joined_chunks(store: NodeStore) -> None:
    content = os.urandom(2 * FETCH_PIECE_BYTES + 5)
    await store.write_bundle(
        bundle(
            [patient("p1", "999-11-1111")],
            documents=[document("d1", "p1", content, "2020-01-01", OrganisationRef(display="X"))],
        )
    )
    pieces = [piece async for piece in store.document_pieces("d1")]
    assert [len(p) for p in pieces] == [FETCH_PIECE_BYTES, FETCH_PIECE_BYTES, 5]
    assert b"".join(pieces) == content


async def test_large_document_reads_back_in_chunks(store: NodeStore) -> None:
    content = os.urandom(3 * DOCUMENT_CHUNK_BYTES + 12_345)  # > 200 KB, not a chunk multiple
    assert len(content) > 200_000
    author = OrganisationRef(display="Somewhere")
    await store.write_bundle(
        bundle(
            [patient("p1", "999-11-1111")],
            documents=[document("d1", "p1", content, "2020-01-01", author)],
        )
    )
    key = (await store.patients())[0].patient_key
    record = await store.document(key, "d1")
    assert record is not None
    assert (record.size, record.sha256) == (len(content), hashlib.sha256(content).hexdigest())
    chunks = [chunk async for chunk in store.document_chunks("d1")]
    assert len(chunks) == 4 and all(len(c) <= DOCUMENT_CHUNK_BYTES for c in chunks)
    assert b"".join(chunks) == content
    # A fetch sends stored chunks joined into pieces of at most FETCH_PIECE_BYTES.
    pieces = [piece async for piece in store.document_pieces("d1")]
    assert [len(p) for p in pieces] == [len(content)]
    assert pieces == [content]
    # Re-ingest with other content replaces the chunks instead of adding to them.
    shorter = b"short"
    await store.write_bundle(
        bundle(
            [patient("p1", "999-11-1111")],
            documents=[document("d1", "p1", shorter, "2020-01-01", author)],
        )
    )
    assert [chunk async for chunk in store.document_chunks("d1")] == [shorter]
    assert [chunk async for chunk in store.document_chunks("no-such-document")] == []


async def test_documents_newest_first_and_only_the_patients_own(store: NodeStore) -> None:
    org = resource(
        "Organization", "org1", None, label="General Hospital", identifiers=((ORG_SYSTEM, "o-1"),)
    )
    docs = [
        document("old", "p1", b"a", "1999-05-28", OrganisationRef(fhir_id="org1")),
        document(
            "new",
            "p1",
            b"b",
            "2021-01-01T10:00:00+00:00",
            OrganisationRef(system=ORG_SYSTEM, value="o-1"),
        ),
        document("mid", "p1", b"c", "2010-01-01T00:00:00+00:00", OrganisationRef(display="Shown")),
        document("theirs", "p2", b"d", "2015-01-01", OrganisationRef()),
    ]
    await store.write_bundle(
        bundle([patient("p1", "999-11-1111"), patient("p2", "999-22-2222")], [org], docs)
    )
    p1, p2 = await store.patients()
    listed = await store.documents_of(p1.patient_key)
    assert [d.document_id for d in listed] == ["new", "mid", "old"]
    assert [d.author_organisation for d in listed] == [
        "General Hospital",
        "Shown",
        "General Hospital",
    ]
    assert await store.document(p1.patient_key, "theirs") is None
    theirs = await store.document(p2.patient_key, "theirs")
    assert theirs is not None and theirs.author_organisation == ""
    assert await store.document_count() == 4


async def test_conditional_create_keeps_the_first_holder_of_an_identifier(store: NodeStore) -> None:
    first = resource("Organization", "a", None, identifiers=((ORG_SYSTEM, "x"),))
    second = resource(
        "Organization", "b", None, identifiers=((ORG_SYSTEM, "x"),), if_none_exist=(ORG_SYSTEM, "x")
    )
    await store.write_bundle(bundle([], [first]))
    written = await store.write_bundle(bundle([], [second]))
    assert written.resources == 0 and "ifNoneExist" in written.skipped[0]
    assert await store.resource_count() == 1
    resolved = await store.resolve(f"Organization?identifier={ORG_SYSTEM}|x")
    assert resolved is not None and resolved["id"] == "a"


async def test_exchange_consent(store: NodeStore) -> None:
    await store.write_bundle(bundle([patient("p1", "999-11-1111")]))
    (p1,) = await store.patients()
    assert p1.exchange_consent is False  # default deny
    await store.set_exchange_consent(p1.patient_key, True)
    assert (await store.patients())[0].exchange_consent is True
    await store.set_exchange_consent(p1.patient_key, False)
    assert (await store.patients())[0].exchange_consent is False
    with pytest.raises(NotFound):
        await store.set_exchange_consent(p1.patient_key + 1, True)


async def test_two_writers_on_one_file_wait_for_each_other(tmp_path: Path) -> None:
    """The node server and the admin CLI share the file: BEGIN IMMEDIATE + busy_timeout."""
    path = tmp_path / "node.db"
    first, second = await NodeStore.open(path), await NodeStore.open(path)
    try:
        drafts = [bundle([patient(f"p{i}", f"999-00-{i:04d}")]) for i in range(40)]
        await asyncio.gather(
            *(store.write_bundle(d) for store, d in zip([first, second] * 20, drafts, strict=True))
        )
        assert len(await first.patients()) == 40
        assert await second.pending_index_count() == 40
    finally:
        await first.close()
        await second.close()
