"""The answering side: what this node tells a peer about one patient.

A peer asks by pseudonym. The holder finds the patient, lets the patient's
consents decide (``node.consent.decide``), writes the audit record, and
only then lists documents or opens one. A denial carries nothing else: no
metadata, no count. No access happens without its audit record: if the
record cannot be written, the access is refused.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from node.answers import HolderAnswer, Requester, Status
from node.audit import AuditLog, AuditRecord
from node.consent import ConsentDecision, ConsentPolicy, decide
from node.records import DocumentRecord, PatientRecord
from node.store import NodeStore
from transmural.clock import Clock, SystemClock
from transmural.errors import InvalidInput, NotFound, PermissionDenied
from transmural.pseudonym import is_pseudonym

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request came from: the calling node (from its certificate) and address."""

    node_id: str
    address: str
    correlation_id: str


class RecordHolder:
    """Answers peers' questions from this node's store, under the patient's consent."""

    def __init__(
        self,
        store: NodeStore,
        audit: AuditLog,
        policy: ConsentPolicy,
        clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._audit = audit
        self._policy = policy
        self._clock = clock or SystemClock()

    async def find_documents(
        self, pseudonym: bytes, requester: Requester, origin: Origin
    ) -> HolderAnswer:
        """The patient's documents here that consent allows, or why there are none."""
        patient = await self._patient(pseudonym)
        if patient is None:
            await self._log(
                "search",
                "denied",
                requester,
                origin,
                pseudonym,
                None,
                reason="no record of this patient here",
            )
            return HolderAnswer(Status.NO_RECORD)
        decision = await self._decide(patient, requester)
        if not decision.allowed:
            await self._log(
                "search",
                "denied",
                requester,
                origin,
                pseudonym,
                patient,
                decision=decision,
                reason="consent",
            )
            return HolderAnswer(Status.CONSENT_DENIED)
        documents = [
            d
            for d in await self._store.documents_of(patient.patient_key)
            if not d.categories & decision.denied_categories
        ]
        await self._log(
            "search",
            "granted",
            requester,
            origin,
            pseudonym,
            patient,
            decision=decision,
            documents=documents,
        )
        log.info(
            "search %s: %d documents to %s of %s (%s)",
            origin.correlation_id,
            len(documents),
            requester.clinician_id,
            origin.node_id,
            decision.rule,
        )
        return HolderAnswer(Status.OK, documents)

    async def open_document(
        self, pseudonym: bytes, document_id: str, requester: Requester, origin: Origin
    ) -> tuple[DocumentRecord, AsyncIterator[bytes]]:
        """Metadata and content stream of one of the patient's documents."""
        if not document_id or len(document_id) > 256:
            raise InvalidInput("document id must be 1 to 256 characters")
        patient = await self._patient(pseudonym)
        if patient is None:
            await self._log(
                "fetch",
                "denied",
                requester,
                origin,
                pseudonym,
                None,
                reason="no record of this patient here",
                documents_ids=[document_id],
            )
            raise NotFound("this facility holds no record of the patient")
        decision = await self._decide(patient, requester)
        document = await self._store.document(patient.patient_key, document_id)
        refused = not decision.allowed or (
            document is not None and bool(document.categories & decision.denied_categories)
        )
        if refused:
            await self._log(
                "fetch",
                "denied",
                requester,
                origin,
                pseudonym,
                patient,
                decision=decision,
                reason="consent",
                documents_ids=[document_id],
            )
            raise PermissionDenied("the patient's consent does not allow sharing this with you")
        if document is None:
            await self._log(
                "fetch",
                "denied",
                requester,
                origin,
                pseudonym,
                patient,
                decision=decision,
                reason="no such document",
                documents_ids=[document_id],
            )
            raise NotFound(f"no document {document_id!r} for this patient here")
        await self._log(
            "fetch",
            "granted",
            requester,
            origin,
            pseudonym,
            patient,
            decision=decision,
            documents=[document],
        )
        return document, self._store.document_chunks(document_id)

    async def _decide(self, patient: PatientRecord, requester: Requester) -> ConsentDecision:
        consents = await self._store.consents_of(patient.patient_key)
        return decide(
            consents,
            requester.organisation_id,
            requester.organisation_category,
            requester.purpose_of_use,
            requester.reason,
            self._policy,
            self._clock.now(),
        )

    async def _patient(self, pseudonym: bytes) -> PatientRecord | None:
        if not is_pseudonym(pseudonym):
            raise InvalidInput("pseudonym must be 32 bytes")
        return await self._store.patient_by_pseudonym(pseudonym)

    async def _log(
        self,
        action: str,
        outcome: str,
        requester: Requester,
        origin: Origin,
        pseudonym: bytes,
        patient: PatientRecord | None,
        *,
        decision: ConsentDecision | None = None,
        reason: str = "",
        documents: list[DocumentRecord] | None = None,
        documents_ids: list[str] | None = None,
    ) -> None:
        """Append the answering side's audit record; Unavailable refuses the access."""
        btg = decision is not None and decision.break_the_glass
        await self._audit.append(
            AuditRecord(
                action="break-the-glass" if btg else action,
                outcome=outcome,  # type: ignore[arg-type]
                side="answering",
                outcome_reason=reason or (decision.rule if decision else ""),
                patient_key=None if patient is None else patient.patient_key,
                pseudonym=pseudonym.hex(),
                document_ids=documents_ids or [d.document_id for d in documents or []],
                clinician_id=requester.clinician_id,
                role=requester.role,
                organisation_id=requester.organisation_id,
                on_behalf_of=requester.on_behalf_of,
                requesting_node=origin.node_id,
                requesting_address=origin.address,
                purpose_of_use=requester.purpose_of_use,
                consent_rule=decision.rule if decision else "",
                break_the_glass=btg,
                break_the_glass_reason=requester.reason if btg else "",
                correlation_id=origin.correlation_id,
            )
        )
