"""Whether this node may share a patient's data with a requester.

A stand-in for the full consent model: the patient has opted in to
exchange (yes/no, default no). Every decision goes through ``may_share``
so the real model replaces one function.
"""

from __future__ import annotations

from node.answers import Requester
from node.records import PatientRecord


def may_share(patient: PatientRecord, requester: Requester) -> bool:
    """True when the patient's consent lets this node answer ``requester``."""
    del requester  # the opt-in stand-in does not look at who asks
    return patient.exchange_consent
