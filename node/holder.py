"""The answering side: what this node tells a peer about one patient.

A peer asks by pseudonym. The holder finds the patient, asks consent, and
only then lists documents or opens one. A denial carries nothing else: no
metadata, no count.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from node.answers import HolderAnswer, Requester, Status
from node.consent import may_share
from node.records import DocumentRecord, PatientRecord
from node.store import NodeStore
from transmural.errors import InvalidInput, NotFound, PermissionDenied
from transmural.pseudonym import is_pseudonym

log = logging.getLogger(__name__)

ConsentCheck = Callable[[PatientRecord, Requester], bool]


class RecordHolder:
    """Answers peers' questions from this node's store."""

    def __init__(self, store: NodeStore, consent: ConsentCheck = may_share) -> None:
        self._store = store
        self._consent = consent

    async def find_documents(
        self, pseudonym: bytes, requester: Requester, correlation_id: str
    ) -> HolderAnswer:
        """The patient's documents here, or why there are none to give."""
        patient = await self._patient(pseudonym)
        if patient is None:
            log.info("search %s: no record", correlation_id)
            return HolderAnswer(Status.NO_RECORD)
        if not self._consent(patient, requester):
            log.info("search %s: consent denied for %s", correlation_id, requester.clinician_id)
            return HolderAnswer(Status.CONSENT_DENIED)
        documents = await self._store.documents_of(patient.patient_key)
        log.info(
            "search %s: %d documents to %s (%s, %s, %s)", correlation_id, len(documents),
            requester.clinician_id, requester.role, requester.organisation_id,
            requester.purpose_of_use,
        )  # fmt: skip
        return HolderAnswer(Status.OK, documents)

    async def open_document(
        self, pseudonym: bytes, document_id: str, requester: Requester, correlation_id: str
    ) -> tuple[DocumentRecord, AsyncIterator[bytes]]:
        """Metadata and content stream of one of the patient's documents."""
        if not document_id or len(document_id) > 256:
            raise InvalidInput("document id must be 1 to 256 characters")
        patient = await self._patient(pseudonym)
        if patient is None:
            raise NotFound("this facility holds no record of the patient")
        if not self._consent(patient, requester):
            raise PermissionDenied("the patient's consent does not allow sharing with you")
        document = await self._store.document(patient.patient_key, document_id)
        if document is None:
            raise NotFound(f"no document {document_id!r} for this patient here")
        log.info(
            "fetch %s: document %s to %s (%s, %s)", correlation_id, document_id,
            requester.clinician_id, requester.organisation_id, requester.purpose_of_use,
        )  # fmt: skip
        return document, self._store.document_chunks(document_id)

    async def _patient(self, pseudonym: bytes) -> PatientRecord | None:
        if not is_pseudonym(pseudonym):
            raise InvalidInput("pseudonym must be 32 bytes")
        return await self._store.patient_by_pseudonym(pseudonym)
