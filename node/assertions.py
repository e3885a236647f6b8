"""Requester assertions from this node's side: sign when asking, check when answering.

Every Peer call carries an assertion signed with the asking node's key:
who the clinician is, why they ask, for which patient (pseudonym) and for
which facility (audience). The answering node believes nothing about the
requester that is not in a verified assertion from the node whose
certificate made the call. ``transmural.assertion`` holds the format and
the checks; this module binds them to the node's key, id and clock.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from node import const
from node.answers import Requester
from node.gateway import PURPOSES
from node.users import ROLES, USER_ID
from transmural import assertion, pki
from transmural.auth import Caller
from transmural.clock import Clock
from transmural.errors import InvalidInput, PermissionDenied
from transmural.names import is_printable_name


class AssertionSigner:
    """Signs the assertions this node sends, with its certificate's key."""

    def __init__(
        self,
        node_id: str,
        organisation_id: str,
        private_key: ec.EllipticCurvePrivateKey | None,
        clock: Clock,
    ) -> None:
        self._node_id = node_id
        self._organisation_id = organisation_id
        # --insecure-dev has no certificate: sign with a throwaway key, which
        # an insecure peer does not check (it has no certificate to check by).
        self._key = private_key or pki.new_private_key()
        self._clock = clock

    def sign(self, requester: Requester, pseudonym: bytes, audience: str) -> tuple[bytes, bytes]:
        """(payload, signature) for one call to ``audience``."""
        claim = assertion.new_assertion(
            issuer=self._node_id,
            organisation_id=self._organisation_id,
            clinician_id=requester.clinician_id,
            display_name=requester.display_name,
            role=requester.role,
            purpose_of_use=requester.purpose_of_use,
            pseudonym=pseudonym,
            audience=audience,
            now=self._clock.now(),
            lifetime_s=const.ASSERTION_LIFETIME_S,
            reason=requester.reason,
            on_behalf_of=requester.on_behalf_of,
        )
        return assertion.sign(claim, self._key)


class AssertionCheck:
    """Turns a peer's signed assertion into the requester this node answers."""

    def __init__(self, verifier: assertion.AssertionVerifier | None, node_id: str) -> None:
        self._verifier = verifier
        self._node_id = node_id

    def requester(
        self, payload: bytes, signature: bytes, pseudonym: bytes, caller: Caller | None
    ) -> Requester:
        if not payload:
            raise InvalidInput("the call carries no requester assertion")
        if self._verifier is None:  # --insecure-dev: nothing to verify against
            claim = _unverified(payload)
        elif caller is None:
            raise PermissionDenied("no verified certificate on this call")
        else:
            claim = self._verifier.verify(payload, signature, caller.identity, caller.public_key)
        if claim.pseudonym != pseudonym:
            raise PermissionDenied("the assertion was issued for another patient")
        _check_claim(claim)
        return Requester(
            clinician_id=claim.clinician_id,
            display_name=claim.display_name,
            role=claim.role,
            organisation_id=claim.organisation_id,
            purpose_of_use=claim.purpose_of_use,
            reason=claim.reason,
            on_behalf_of=claim.on_behalf_of,
            organisation_category="" if caller is None else caller.identity.organisation_category,
        )


def _check_claim(claim: assertion.RequesterAssertion) -> None:
    """Refuse what a signed assertion may not say, whoever signed it."""
    if claim.purpose_of_use not in PURPOSES:
        raise PermissionDenied(
            f"purpose of use {claim.purpose_of_use!r} is not one this node serves"
        )
    if claim.role not in ROLES:
        raise PermissionDenied(f"role {claim.role!r} is not a clinical role this node answers")
    if not USER_ID.fullmatch(claim.clinician_id) or not is_printable_name(claim.display_name):
        raise InvalidInput("the assertion's clinician id or name has characters it may not have")


def _unverified(payload: bytes) -> assertion.RequesterAssertion:
    return assertion.parse(payload)
