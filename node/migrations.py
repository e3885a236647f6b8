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

_V4 = """
-- Consent records (node.consent): one row per FHIR Consent. Withdrawn ones
-- stay, for the record. data is space-separated categories, '' = all data.
CREATE TABLE consents (
    consent_id   TEXT PRIMARY KEY,
    patient_key  INTEGER NOT NULL REFERENCES patients (patient_key) ON DELETE CASCADE,
    decision     TEXT NOT NULL CHECK (decision IN ('permit', 'deny')),
    actor_kind   TEXT NOT NULL CHECK (actor_kind IN ('all', 'organisation', 'category')),
    actor        TEXT NOT NULL,
    data         TEXT NOT NULL,
    period_start TEXT NOT NULL,
    period_end   TEXT,
    recorded_by  TEXT NOT NULL,
    recorded_via TEXT NOT NULL CHECK (recorded_via IN ('desk', 'portal')),
    recorded_at  TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('active', 'withdrawn')),
    withdrawn_at TEXT,
    CHECK ((status = 'withdrawn') = (withdrawn_at IS NOT NULL)),
    CHECK ((actor_kind = 'all') = (actor = ''))
);
CREATE INDEX consents_patient ON consents (patient_key);

-- The yes/no stand-in of earlier versions becomes a permit of all data to
-- all organisations, so an upgrade shares exactly what it shared before.
INSERT INTO consents (consent_id, patient_key, decision, actor_kind, actor, data,
                      period_start, recorded_by, recorded_via, recorded_at, status)
SELECT 'c-' || lower(hex(randomblob(6))), patient_key, 'permit', 'all', '', '',
       updated_at, 'schema upgrade (yes/no consent)', 'desk', updated_at, 'active'
  FROM patients WHERE exchange_consent = 1;
"""

_V5 = """
-- The audit log (node.audit): one row per access, grant, denial or change,
-- hash-chained (hash = SHA-256(prev_hash || canonical JSON of the record)).
-- No foreign key to patients: the log outlives the patient's data.
CREATE TABLE audit_log (
    seq                    INTEGER PRIMARY KEY,
    event_id               TEXT NOT NULL UNIQUE,
    time                   TEXT NOT NULL,
    action                 TEXT NOT NULL,
    outcome                TEXT NOT NULL CHECK (outcome IN ('granted', 'denied', 'error')),
    side                   TEXT NOT NULL CHECK (side IN ('asking', 'answering', 'local')),
    outcome_reason         TEXT NOT NULL,
    patient_key            INTEGER,
    pseudonym              TEXT NOT NULL,
    document_ids           TEXT NOT NULL,
    clinician_id           TEXT NOT NULL,
    role                   TEXT NOT NULL,
    organisation_id        TEXT NOT NULL,
    on_behalf_of           TEXT NOT NULL,
    requesting_node        TEXT NOT NULL,
    requesting_address     TEXT NOT NULL,
    purpose_of_use         TEXT NOT NULL,
    consent_rule           TEXT NOT NULL,
    break_the_glass        INTEGER NOT NULL CHECK (break_the_glass IN (0, 1)),
    break_the_glass_reason TEXT NOT NULL,
    correlation_id         TEXT NOT NULL,
    prev_hash              BLOB NOT NULL,
    hash                   BLOB NOT NULL
);
CREATE INDEX audit_log_patient ON audit_log (patient_key) WHERE patient_key IS NOT NULL;
CREATE INDEX audit_log_pseudonym ON audit_log (pseudonym) WHERE pseudonym != '';
CREATE INDEX audit_log_correlation ON audit_log (correlation_id) WHERE correlation_id != '';

-- Append-only: these stop accidents; the hash chain is what shows tampering.
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only: records cannot be changed');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only: records cannot be deleted');
END;
"""

_V6 = """
-- The data categories a document shows (node.categories), space-separated:
-- a consent that denies one category removes exactly these documents.
-- Documents ingested before this delta have none until re-ingested.
ALTER TABLE documents ADD COLUMN categories TEXT NOT NULL DEFAULT '';
"""

_V7 = """
-- Which node this database belongs to, set when a node first serves or ingests
-- with it: a config pointing at another node's database is refused instead of
-- serving (and publishing) that node's records under this node's name.
CREATE TABLE node_identity (
    only_row        INTEGER PRIMARY KEY CHECK (only_row = 1),
    node_id         TEXT NOT NULL,
    organisation_id TEXT NOT NULL,
    bound_at        TEXT NOT NULL
);
"""

MIGRATIONS: list[str] = [_V1, _V2, _V3, _V4, _V5, _V6, _V7]
