"""The node database schema, as numbered deltas (Synapse-style).

``MIGRATIONS[n - 1]`` takes a database from version ``n - 1`` to ``n``.
Deltas are append-only: once released, a delta never changes; a new
column or index is a new delta at the end. ``transmural.database`` applies
the missing ones when ``NodeStore.open`` opens the file, in one ``BEGIN
IMMEDIATE`` transaction, recording each in ``schema_version``, so two
processes opening one file at once (node server and admin CLI) cannot both
apply a delta.
"""

from __future__ import annotations

from transmural.database import statements

# ``statements`` is re-exported so the deltas can be checked where they live.
__all__ = ["MIGRATIONS", "statements"]

_V1 = """
-- One row per patient of this facility. The national identifier is kept
-- canonical (transmural.identifiers) so a lookup by any spelling finds it.
CREATE TABLE patients (
    patient_key      INTEGER PRIMARY KEY,
    fhir_id          TEXT NOT NULL UNIQUE,
    id_system        TEXT,
    id_value         TEXT,
    pseudonym        BLOB,
    family           TEXT NOT NULL DEFAULT '',
    given            TEXT NOT NULL DEFAULT '',
    birth_date       TEXT NOT NULL DEFAULT '',
    gender           TEXT NOT NULL DEFAULT '',
    exchange_consent INTEGER NOT NULL DEFAULT 0 CHECK (exchange_consent IN (0, 1)),
    updated_at       TEXT NOT NULL,
    CHECK ((id_system IS NULL) = (id_value IS NULL))
);
CREATE UNIQUE INDEX patients_national_id ON patients (id_system, id_value)
    WHERE id_value IS NOT NULL;
CREATE INDEX patients_pseudonym ON patients (pseudonym) WHERE pseudonym IS NOT NULL;

-- Every identifier of a patient (MRN, SSN, passport, ...), for lookups.
CREATE TABLE patient_identifiers (
    patient_key INTEGER NOT NULL REFERENCES patients (patient_key) ON DELETE CASCADE,
    system      TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (patient_key, system, value)
) WITHOUT ROWID;
CREATE INDEX patient_identifiers_lookup ON patient_identifiers (system, value);

-- Every FHIR resource as ingested (references rewritten to Type/id).
-- patient_key is NULL for shared resources (Organization, Practitioner, ...).
CREATE TABLE resources (
    resource_key  INTEGER PRIMARY KEY,
    resource_type TEXT NOT NULL,
    fhir_id       TEXT NOT NULL,
    patient_key   INTEGER REFERENCES patients (patient_key) ON DELETE CASCADE,
    label         TEXT,
    json          TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    UNIQUE (resource_type, fhir_id)
);
CREATE INDEX resources_patient ON resources (patient_key, resource_type)
    WHERE patient_key IS NOT NULL;

-- Identifiers of stored resources: resolves conditional references
-- (Organization?identifier=system|value) when read, whatever the load order.
CREATE TABLE resource_identifiers (
    resource_type TEXT NOT NULL,
    fhir_id       TEXT NOT NULL,
    system        TEXT NOT NULL,
    value         TEXT NOT NULL,
    PRIMARY KEY (resource_type, fhir_id, system, value)
) WITHOUT ROWID;
CREATE INDEX resource_identifiers_lookup ON resource_identifiers (resource_type, system, value);

-- Documents offered to peers. The author organisation is a reference
-- (literal id or conditional system/value) named when read.
CREATE TABLE documents (
    document_id       TEXT PRIMARY KEY,
    patient_key       INTEGER NOT NULL REFERENCES patients (patient_key) ON DELETE CASCADE,
    source            TEXT NOT NULL,
    title             TEXT NOT NULL,
    type_system       TEXT NOT NULL,
    type_code         TEXT NOT NULL,
    type_display      TEXT NOT NULL,
    content_type      TEXT NOT NULL,
    size              INTEGER NOT NULL,
    sha256            TEXT NOT NULL,
    created           TEXT NOT NULL,
    author_type       TEXT NOT NULL DEFAULT 'Organization',
    author_id         TEXT,
    author_system     TEXT,
    author_value      TEXT,
    author_display    TEXT NOT NULL DEFAULT '',
    updated_at        TEXT NOT NULL
);
CREATE INDEX documents_patient ON documents (patient_key, created);

-- Content in DOCUMENT_CHUNK_BYTES pieces, so a fetch streams in bounded memory.
CREATE TABLE document_chunks (
    chunk_key   INTEGER PRIMARY KEY,
    document_id TEXT NOT NULL REFERENCES documents (document_id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    data        BLOB NOT NULL,
    UNIQUE (document_id, seq)
);

-- Durable queue of registry publishes, drained oldest first by the publisher.
CREATE TABLE index_outbox (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    pseudonym BLOB NOT NULL,
    withdrawn INTEGER NOT NULL CHECK (withdrawn IN (0, 1))
);
"""

_V2 = """
-- Clinicians who may use this node's gateway. Only a hash of each bearer
-- token is kept; the token itself is shown once, when the user is added.
CREATE TABLE users (
    user_id      TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    role         TEXT NOT NULL,
    token_hash   BLOB NOT NULL UNIQUE,
    created_at   TEXT NOT NULL,
    expires_at   INTEGER NOT NULL
);
"""

_V3 = """
-- The registry's revocation list, as last fetched: a node restarted while
-- the registry is down must still refuse revoked peers.
CREATE TABLE revoked_certificates (
    serial      TEXT PRIMARY KEY,
    recorded_at TEXT NOT NULL
) WITHOUT ROWID;
"""

MIGRATIONS: list[str] = [_V1, _V2, _V3]
