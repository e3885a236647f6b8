"""Recording consent: the one path every consent change takes.

Whoever records a consent (the admin CLI at the desk, an import, devnet,
later the patient portal) goes through ``ConsentDesk``: the consent is
stored, the change is written to the audit log, and the patient's listing
in the registry is queued for re-evaluation (the index follows consent),
all in one transaction: a consent the audit log cannot record is not
stored either.
"""

from __future__ import annotations

from collections.abc import Sequence

from node.audit import AuditRecord, stamped
from node.consent import ConsentRecord, check_recorded_by, describe, new_consent_id
from node.store import NodeStore
from transmural.clock import Clock, SystemClock, utc_iso


class ConsentDesk:
    """Stores consent changes, audits them and re-lists the patient."""

    def __init__(self, store: NodeStore, clock: Clock | None = None) -> None:
        self._store = store
        self._clock = clock or SystemClock()

    async def record(
        self, records: Sequence[ConsentRecord], action: str = "consent-add", by: str = ""
    ) -> None:
        """Store consents (all or none), audit each, re-list their patients.

        ``by`` is who made the change here (the admin's OS user), when it is
        not the consent's own ``recorded_by``; the audit record names both.
        """
        audit = [
            self._audit_record(action, r, by or r.recorded_by, f"recorded by {r.recorded_by}")
            for r in records
        ]
        await self._store.add_consents(records, audit)

    async def withdraw(self, consent_id: str, by: str, operator: str = "") -> ConsentRecord:
        """Withdraw a consent; ``by`` is who withdrew it, ``operator`` who typed it (audited)."""
        check_recorded_by(by)
        return await self._store.withdraw_consent(
            consent_id,
            utc_iso(self._clock.now()),
            audit=lambda withdrawn: self._audit_record(
                "consent-withdraw", withdrawn, operator or by, f"withdrawn by {by}"
            ),
        )

    def blanket(self, patient_key: int, permit: bool, recorded_by: str) -> ConsentRecord:
        """A consent for all organisations and all data, from now on."""
        now = utc_iso(self._clock.now())
        return ConsentRecord(
            consent_id=new_consent_id(), patient_key=patient_key,
            decision="permit" if permit else "deny", actor_kind="all", actor="",
            data=frozenset(), period_start=now[:10], period_end=None,
            recorded_by=recorded_by, recorded_via="desk", recorded_at=now,
        )  # fmt: skip

    def _audit_record(self, action: str, record: ConsentRecord, by: str, said: str) -> AuditRecord:
        return stamped(
            AuditRecord(
                action=action, outcome="granted", side="local",
                outcome_reason=f"{describe(record)}; {said}", patient_key=record.patient_key,
                clinician_id=by, consent_rule=record.consent_id,
            ),
            self._clock,
        )  # fmt: skip
