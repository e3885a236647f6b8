"""What the node's store hands out: plain, immutable records.

The peer service, the gateway and the CLIs see these and never a database
row or a FHIR resource, so the store can change shape without them noticing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transmural.identifiers import Identifier


@dataclass(frozen=True, slots=True)
class PatientRecord:
    """One patient known to this node.

    ``identifier`` is the canonical national identifier (None when the
    source had none); ``pseudonym`` is None until the node has a network key
    to compute it with, and such a patient is not in the registry's index.
    """

    patient_key: int
    fhir_id: str
    identifier: Identifier | None
    pseudonym: bytes | None
    family: str
    given: str
    birth_date: str
    exchange_consent: bool


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    """Metadata of one document; mirrors the proto ``DocumentMetadata``.

    ``author_organisation`` is resolved when read, not when ingested, so a
    patient bundle loaded before its provider bundle still names the
    organisation once the provider bundle is in.
    """

    document_id: str
    patient_key: int
    title: str
    type_system: str
    type_code: str
    type_display: str
    content_type: str
    size: int
    sha256: str
    created: str
    author_organisation: str
    categories: frozenset[str] = frozenset()  # node.categories: what data it shows


@dataclass(frozen=True, slots=True)
class IndexChange:
    """One row of the publish outbox: (un)publish ``pseudonym`` at this node."""

    seq: int
    pseudonym: bytes
    withdrawn: bool


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What one ingested bundle file added.

    ``unpublished`` counts patients stored without a national identifier
    (or without a network key), which the registry will not know of;
    ``new_patients`` those this node did not hold before (a bundle loaded
    again adds none), ``patient_keys`` and ``unindexed_keys`` which patients
    they are (to count distinct ones over many bundles); ``kept_identifiers``
    patients whose bundle had no national identifier, who keep the one this
    node knew them by (``node.bundle_writer``); ``skipped`` holds one line per entry or
    attachment left out on purpose.
    """

    file: str
    patients: int = 0
    new_patients: int = 0
    resources: int = 0
    documents: int = 0
    published: int = 0
    unpublished: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    patient_keys: frozenset[int] = frozenset()
    unindexed_keys: frozenset[int] = frozenset()
    kept_identifiers: int = 0

    def summary(self) -> str:
        """One line for a CLI (Synthea file names carry the patient's name: not for logs)."""
        return (
            f"{self.file}: {self.patients} patients ({self.unpublished} not indexed), "
            f"{self.resources} resources, {self.documents} documents, "
            f"{len(self.skipped)} skipped, {self.seconds:.2f} s"
        )


# --- What ingest hands the store to write (one bundle, one transaction) ---


@dataclass(frozen=True, slots=True)
class OrganisationRef:
    """Who authored a document, kept as a reference so it resolves when read.

    ``fhir_id`` for a literal reference, ``system``/``value`` for a
    conditional one; ``display`` is the fallback when neither resolves.
    """

    resource_type: str = "Organization"
    fhir_id: str = ""
    system: str = ""
    value: str = ""
    display: str = ""


@dataclass(frozen=True, slots=True)
class PatientDraft:
    fhir_id: str
    identifier: Identifier | None
    pseudonym: bytes | None
    family: str
    given: str
    birth_date: str
    gender: str
    #: Every identifier of the patient, canonical where the system has rules.
    identifiers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ResourceDraft:
    resource_type: str
    fhir_id: str
    #: FHIR id of the patient whose record this is; None for shared resources.
    patient_fhir_id: str | None
    json: str
    #: Name shown for shared resources (organisation, location, practitioner).
    label: str | None
    identifiers: tuple[tuple[str, str], ...]
    #: ``request.ifNoneExist`` identifier: create only if no other such resource has it.
    if_none_exist: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class DocumentDraft:
    document_id: str
    patient_fhir_id: str
    source: str
    title: str
    type_system: str
    type_code: str
    type_display: str
    content_type: str
    content: bytes
    created: str
    author: OrganisationRef
    size: int
    sha256: str  # lowercase hex, computed with the content (off the event loop)
    categories: frozenset[str] = frozenset()  # node.categories: what data it shows


@dataclass(frozen=True, slots=True)
class BundleDraft:
    """A validated bundle, ready to be written in one transaction."""

    file: str
    patients: list[PatientDraft]
    resources: list[ResourceDraft]
    documents: list[DocumentDraft]
    skipped: list[str]
    #: False when no network key was given: existing pseudonyms are kept.
    pseudonymised: bool


@dataclass(frozen=True, slots=True)
class BundleWritten:
    """What writing a bundle changed (``new_patients``: not at this node before)."""

    patients: int
    resources: int
    documents: int
    published: int
    unpublished: int
    skipped: list[str]
    new_patients: int = 0
    patient_keys: frozenset[int] = frozenset()
    unindexed_keys: frozenset[int] = frozenset()
    kept_identifiers: int = 0


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A clinician allowed to use this node's gateway."""

    user_id: str
    display_name: str
    role: str
    expires_at: int  # epoch seconds
