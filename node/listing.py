"""The index follows consent: whether a patient may be listed in the registry.

Ingest and consent changes queue a patient's pseudonym in the outbox; the
publisher asks this module, at send time, whether the patient may be
located now (``node.consent.locatable``) and sends a publish or an
un-publish accordingly. So the registry never lists a treatment
relationship the patient did not agree to, and a withdrawn consent takes
the entry out on the next publish round, whatever queued it.
"""

from __future__ import annotations

from node.consent import ConsentPolicy, locatable
from node.records import IndexChange
from node.store import NodeStore
from transmural.clock import Clock, SystemClock


class PatientListing:
    """Turns queued pseudonyms into publish or un-publish under consent."""

    def __init__(self, store: NodeStore, policy: ConsentPolicy, clock: Clock | None = None):
        self._store = store
        self._policy = policy
        self._clock = clock or SystemClock()

    async def resolve(self, changes: list[IndexChange]) -> list[IndexChange]:
        """The same changes, each withdrawn unless its patient may be located now."""
        now = self._clock.now()
        resolved = []
        for change in changes:
            patient = await self._store.patient_by_pseudonym(change.pseudonym)
            listed = patient is not None and locatable(
                await self._store.consents_of(patient.patient_key), self._policy, now
            )
            resolved.append(IndexChange(change.seq, change.pseudonym, withdrawn=not listed))
        return resolved
