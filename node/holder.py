"""The answering side: what this node tells a peer about one patient.

A peer asks by pseudonym. The holder finds the patient, lets the patient's
consents decide (``node.consent.decide``), writes the audit record, and
only then lists documents or opens one. A denial carries nothing else: no
metadata, no count. No access happens without its audit record: if the
record cannot be written, the access is refused.

The live report's entries (``find_items``) are filtered as documents are:
an entry whose resource shows a denied data category is left out. An entry
of no category of its own (a vital sign, a procedure, an immunisation) is
data recorded in an encounter and counts as ``encounters``: a consent that
shares only medication does not let it through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from node.answers import HolderAnswer, Requester, Status, check_document_id
from node.audit import AuditLog, AuditRecord
from node.categories import resource_categories
from node.clinical_items import REPORT_TYPES, Extraction, extract
from node.consent import ConsentDecision, ConsentPolicy, ConsentRecord, decide
from node.records import DocumentRecord, PatientRecord
from node.store import NodeStore
from transmural.clock import Clock, SystemClock
from transmural.errors import InvalidInput, NotFound, PermissionDenied, TransmuralError
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
        found = await self._consented("search", pseudonym, requester, origin)
        if isinstance(found, Status):
            return HolderAnswer(found)
        patient, decision = found
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

    async def find_items(
        self, pseudonym: bytes, requester: Requester, origin: Origin
    ) -> HolderAnswer:
        """The patient's report entries here that consent allows, or why there are none.

        As ``find_documents``: one decision, one audit record (action
        ``report``, the number of entries in its reason, no document ids).
        """
        found = await self._consented("report", pseudonym, requester, origin)
        if isinstance(found, Status):
            return HolderAnswer(found)
        patient, decision = found
        resources = await self._store.resources_of(patient.patient_key, REPORT_TYPES)
        extraction = await asyncio.to_thread(_shared_items, resources, decision)
        await self._log(
            "report",
            "granted",
            requester,
            origin,
            pseudonym,
            patient,
            decision=decision,
            reason=f"{len(extraction.items)} items ({decision.rule})",
        )
        log.info(
            "report %s: %d items (%d without a code left out) to %s of %s (%s)",
            origin.correlation_id,
            len(extraction.items),
            extraction.skipped,
            requester.clinician_id,
            origin.node_id,
            decision.rule,
        )
        return HolderAnswer(Status.OK, items=extraction.items)

    async def open_document(
        self, pseudonym: bytes, document_id: str, requester: Requester, origin: Origin
    ) -> tuple[DocumentRecord, AsyncIterator[bytes]]:
        """Metadata and content stream of one of the patient's documents."""
        check_document_id(document_id)
        _check_pseudonym(pseudonym)
        patient, consents = await self._store.patient_and_consents(pseudonym)
        decision, document = None, None
        if patient is not None:
            decision = self._decision(consents, requester)
            document = await self._store.document(patient.patient_key, document_id)
        refusal = _fetch_refusal(patient, decision, document, document_id)
        if refusal is not None:
            reason, error = refusal
            await self._log(
                "fetch", "denied", requester, origin, pseudonym, patient,
                decision=decision, reason=reason, documents_ids=[document_id],
            )  # fmt: skip
            raise error
        assert patient is not None and decision is not None and document is not None
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
        return document, self._store.document_pieces(document_id)

    async def _consented(
        self, action: str, pseudonym: bytes, requester: Requester, origin: Origin
    ) -> tuple[PatientRecord, ConsentDecision] | Status:
        """The patient and a decision that allows something, or (logged) why there is none."""
        _check_pseudonym(pseudonym)
        patient, consents = await self._store.patient_and_consents(pseudonym)
        if patient is None:
            await self._log(
                action,
                "denied",
                requester,
                origin,
                pseudonym,
                None,
                reason="no record of this patient here",
            )
            return Status.NO_RECORD
        decision = self._decision(consents, requester)
        if not decision.allowed:
            await self._log(
                action,
                "denied",
                requester,
                origin,
                pseudonym,
                patient,
                decision=decision,
                reason="consent",
            )
            return Status.CONSENT_DENIED
        return patient, decision

    def _decision(self, consents: list[ConsentRecord], requester: Requester) -> ConsentDecision:
        return decide(
            consents,
            requester.organisation_id,
            requester.organisation_category,
            requester.purpose_of_use,
            requester.reason,
            self._policy,
            self._clock.now(),
        )

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


def _check_pseudonym(pseudonym: bytes) -> None:
    if not is_pseudonym(pseudonym):
        raise InvalidInput("pseudonym must be 32 bytes")


def _shared_items(resources: list[dict[str, Any]], decision: ConsentDecision) -> Extraction:
    """Entries of the resources whose data categories the decision shares (module doc)."""
    denied = decision.denied_categories

    def shared(resource: dict[str, Any]) -> bool:
        categories = resource_categories(resource) or {"encounters"}
        return not categories & denied

    return extract(r for r in resources if shared(r))


def _fetch_refusal(
    patient: PatientRecord | None,
    decision: ConsentDecision | None,
    document: DocumentRecord | None,
    document_id: str,
) -> tuple[str, TransmuralError] | None:
    """Why a fetch is refused (audit reason, error to raise), in the order checked."""
    if patient is None or decision is None:
        return "no record of this patient here", NotFound(
            "this facility holds no record of the patient"
        )
    if not decision.allowed or (
        document is not None and document.categories & decision.denied_categories
    ):
        return "consent", PermissionDenied(
            "the patient's consent does not allow sharing this with you"
        )
    if document is None:
        return "no such document", NotFound(f"no document {document_id!r} for this patient here")
    return None
