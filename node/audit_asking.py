"""The asking node's audit records: who here asked the network for what.

One record when a search or fetch goes out (written before any peer is
asked, so no access happens without its record) and one per facility
answer, all with the correlation id that every answering node's record of
the same search carries too.
"""

from __future__ import annotations

from collections import OrderedDict

from node.answers import Requester
from node.audit import AuditLog, AuditRecord
from node.store import NodeStore

#: Correlation ids whose patient key is kept (searches in flight, and then some).
REMEMBERED_SEARCHES = 1024


class AskingAudit:
    """Writes asking-side records into this node's audit log."""

    def __init__(self, log: AuditLog, store: NodeStore, node_id: str) -> None:
        self._log = log
        self._store = store
        self._node_id = node_id
        #: correlation id -> the patient's local key (None: not held here), recent ones.
        self._patients: OrderedDict[str, int | None] = OrderedDict()

    async def asked(
        self,
        *,
        action: str,
        outcome: str,
        requester: Requester,
        pseudonym: bytes,
        correlation_id: str,
        reason: str,
        node: str,
        documents: list[str],
    ) -> None:
        patient_key = await self._patient_key(pseudonym, correlation_id)
        btg = requester.purpose_of_use == "emergency"
        await self._log.append(
            AuditRecord(
                action=action,
                outcome=outcome,  # type: ignore[arg-type]
                side="asking",
                outcome_reason=reason,
                patient_key=patient_key,
                pseudonym=pseudonym.hex(),
                document_ids=documents,
                clinician_id=requester.clinician_id,
                role=requester.role,
                organisation_id=requester.organisation_id,
                on_behalf_of=requester.on_behalf_of,
                requesting_node=self._node_id,
                requesting_address=node,
                purpose_of_use=requester.purpose_of_use,
                break_the_glass=btg,
                break_the_glass_reason=requester.reason if btg else "",
                correlation_id=correlation_id,
            )
        )

    async def _patient_key(self, pseudonym: bytes, correlation_id: str) -> int | None:
        if correlation_id in self._patients:
            return self._patients[correlation_id]
        patient = await self._store.patient_by_pseudonym(pseudonym)
        key = None if patient is None else patient.patient_key
        self._patients[correlation_id] = key
        if len(self._patients) > REMEMBERED_SEARCHES:
            self._patients.popitem(last=False)
        return key
