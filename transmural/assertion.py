"""The signed requester assertion every Peer call carries (DESIGN flow 5).

Mutual TLS proves which *node* is calling; it says nothing about the
clinician behind the call, why they ask, or which node they mean to ask.
The calling node states that in an assertion signed with its own node key;
the answering node checks it against the caller's certificate, then
decides on consent and writes the audit record from it.

The payload is canonical JSON (sorted keys, no spaces, ASCII, pseudonym in
hex) so the signature covers exactly the bytes on the wire; the verifier
checks those bytes and never re-encodes. Each check failing has its own
error class and gRPC code (see ``transmural.errors``); no message names
the pseudonym.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from transmural.clock import Clock
from transmural.errors import (
    AssertionExpired,
    AssertionIssuerMismatch,
    AssertionReplayed,
    AssertionSignatureInvalid,
    AssertionWrongAudience,
    InvalidAssertion,
    ReplayCacheFull,
)
from transmural.pki import CertificateIdentity
from transmural.pseudonym import PSEUDONYM_LENGTH

DEFAULT_LIFETIME_S = 120
MAX_LIFETIME_S = 300
CLOCK_SKEW_S = 30
MAX_NONCES = 100_000
#: Largest payload accepted; a real one is well under 1 KiB.
MAX_PAYLOAD_BYTES = 4096

_TEXT_FIELDS = (
    "issuer",
    "organisation_id",
    "clinician_id",
    "display_name",
    "role",
    "purpose_of_use",
    "audience",
    "reason",
    "on_behalf_of",
)
#: Must not be empty. The organisation may be (an insecure dev node has none; a
#: certificate always has one, which the verifier compares), and so may the display name.
_REQUIRED_TEXT = ("issuer", "clinician_id", "role", "purpose_of_use", "audience")
_FIELDS = frozenset((*_TEXT_FIELDS, "pseudonym", "issued_at", "expires_at", "nonce"))
#: May be absent from a payload (an assertion without them means "none").
_OPTIONAL_TEXT = ("reason", "on_behalf_of")
_NONCE = re.compile(r"[0-9a-f]{32}")
_PSEUDONYM = re.compile(f"[0-9a-f]{{{2 * PSEUDONYM_LENGTH}}}")


@dataclass(frozen=True, slots=True)
class RequesterAssertion:
    """Who asks, why, about which patient, of which node, until when."""

    issuer: str  # calling node id
    organisation_id: str
    clinician_id: str
    display_name: str
    role: str
    purpose_of_use: str
    pseudonym: bytes = field(repr=False)  # kept out of logs and tracebacks
    audience: str  # target node id
    issued_at: int  # epoch seconds
    expires_at: int  # epoch seconds
    nonce: str  # 128 random bits, hex
    reason: str = ""  # break-the-glass: why (purpose "emergency")
    on_behalf_of: str = ""  # the responsible user the clinician acts for, if another


def new_assertion(
    *,
    issuer: str,
    organisation_id: str,
    clinician_id: str,
    display_name: str,
    role: str,
    purpose_of_use: str,
    pseudonym: bytes,
    audience: str,
    now: float,
    lifetime_s: int = DEFAULT_LIFETIME_S,
    reason: str = "",
    on_behalf_of: str = "",
) -> RequesterAssertion:
    """An assertion for one call to ``audience``, valid ``lifetime_s`` from ``now``.

    InvalidAssertion for what every verifier would refuse as malformed (an
    empty role, a pseudonym of the wrong length), so the mistake shows here
    rather than as a refusal from each peer.
    """
    issued_at = int(now)
    assertion = RequesterAssertion(
        issuer=issuer,
        organisation_id=organisation_id,
        clinician_id=clinician_id,
        display_name=display_name,
        role=role,
        purpose_of_use=purpose_of_use,
        pseudonym=pseudonym,
        audience=audience,
        issued_at=issued_at,
        expires_at=issued_at + lifetime_s,
        nonce=secrets.token_hex(16),
        reason=reason,
        on_behalf_of=on_behalf_of,
    )
    parse(_payload(assertion))
    return assertion


def sign(
    assertion: RequesterAssertion, private_key: ec.EllipticCurvePrivateKey
) -> tuple[bytes, bytes]:
    """(payload, signature): canonical JSON and its ECDSA P-256 / SHA-256 signature (DER)."""
    payload = _payload(assertion)
    return payload, private_key.sign(payload, ec.ECDSA(hashes.SHA256()))


def _payload(assertion: RequesterAssertion) -> bytes:
    # Field by field: dataclasses.asdict deep-copies, and a gateway signs one per holder.
    document: dict[str, Any] = {name: getattr(assertion, name) for name in _FIELDS}
    document["pseudonym"] = assertion.pseudonym.hex()
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")


class AssertionVerifier:
    """Checks assertions addressed to one node and refuses replays.

    The nonce cache lives in memory: a restart forgets it, which admits at
    most a replay within one assertion lifetime of the restart. It keeps a
    nonce until its assertion could no longer pass the time check, and it
    never evicts one still valid: when full of live nonces it refuses new
    assertions with ReplayCacheFull rather than open a replay window.
    ``verify`` does not await, so on one event loop it needs no lock.
    """

    def __init__(
        self,
        node_id: str,
        clock: Clock,
        max_lifetime_s: int = MAX_LIFETIME_S,
        clock_skew_s: int = CLOCK_SKEW_S,
        max_nonces: int = MAX_NONCES,
    ) -> None:
        self._node_id = node_id
        self._clock = clock
        self._max_lifetime_s = max_lifetime_s
        self._skew_s = clock_skew_s
        self._max_nonces = max_nonces
        self._seen: set[tuple[str, str]] = set()
        self._forget: list[tuple[float, tuple[str, str]]] = []  # heap of (forget at, key)

    def verify(
        self,
        payload: bytes,
        signature: bytes,
        caller: CertificateIdentity,
        caller_public_key: ec.EllipticCurvePublicKey,
    ) -> RequesterAssertion:
        """The assertion, if every check passes; else the error of the first that fails.

        ``caller`` and ``caller_public_key`` come from the caller's verified
        mutual-TLS certificate, never from the request.
        """
        assertion = parse(payload)
        try:
            caller_public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise AssertionSignatureInvalid(
                "the assertion's signature does not verify with the caller's certificate key"
            ) from None
        if assertion.issuer != caller.node_id:
            raise AssertionIssuerMismatch(
                f"assertion was issued by {assertion.issuer}, "
                f"but the caller's certificate is {caller.node_id}"
            )
        if assertion.organisation_id != caller.organisation_id:
            raise AssertionIssuerMismatch(
                f"assertion names organisation {assertion.organisation_id}, "
                f"but the caller's certificate names {caller.organisation_id}"
            )
        if assertion.audience != self._node_id:
            raise AssertionWrongAudience(
                f"assertion is for {assertion.audience}, not {self._node_id}"
            )
        now = self._clock.now()
        self._check_time(assertion, now)
        self._record(assertion, now)
        return assertion

    def _check_time(self, assertion: RequesterAssertion, now: float) -> None:
        ahead = assertion.issued_at - now
        if ahead > self._skew_s:
            raise AssertionExpired(
                f"assertion was issued {math.ceil(ahead)} s in the future "
                f"(allowed clock skew {self._skew_s} s)"
            )
        late = now - assertion.expires_at
        if late > self._skew_s:
            raise AssertionExpired(
                f"assertion expired {math.ceil(late)} s ago (allowed clock skew {self._skew_s} s)"
            )
        lifetime = assertion.expires_at - assertion.issued_at
        if lifetime > self._max_lifetime_s:
            raise AssertionExpired(
                f"assertion is valid for {lifetime} s, longer than the {self._max_lifetime_s} s "
                "this node accepts"
            )

    def _record(self, assertion: RequesterAssertion, now: float) -> None:
        while self._forget and self._forget[0][0] < now:
            self._seen.discard(heapq.heappop(self._forget)[1])
        key = (assertion.issuer, assertion.nonce)
        if key in self._seen:
            raise AssertionReplayed(
                f"assertion nonce {assertion.nonce} from {assertion.issuer} was already used"
            )
        if len(self._seen) >= self._max_nonces:
            raise ReplayCacheFull(
                "this node is checking too many recent requests for replay: retry shortly"
            )
        self._seen.add(key)
        # After this moment the time check refuses the assertion, so the nonce can go.
        heapq.heappush(self._forget, (assertion.expires_at + self._skew_s, key))


def parse(payload: bytes) -> RequesterAssertion:
    """The assertion a payload states, checked for shape only; InvalidAssertion if malformed."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidAssertion(f"assertion payload is over {MAX_PAYLOAD_BYTES} bytes")
    try:
        document = json.loads(payload, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as error:
        raise InvalidAssertion(f"assertion payload is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidAssertion("assertion payload is not a JSON object")
    for name in _OPTIONAL_TEXT:
        document.setdefault(name, "")
    missing, unknown = _FIELDS - document.keys(), document.keys() - _FIELDS
    if missing or unknown:
        raise InvalidAssertion(
            f"assertion payload fields wrong: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    for name in _TEXT_FIELDS:
        if not isinstance(document[name], str):
            raise InvalidAssertion(f"assertion field {name} is not a string")
    for name in _REQUIRED_TEXT:
        if not document[name]:
            raise InvalidAssertion(f"assertion field {name} is empty")
    for name in ("issued_at", "expires_at"):
        if type(document[name]) is not int:
            raise InvalidAssertion(f"assertion field {name} is not whole epoch seconds")
    if document["expires_at"] <= document["issued_at"]:
        raise InvalidAssertion("assertion expires before it is issued")
    if not isinstance(document["nonce"], str) or not _NONCE.fullmatch(document["nonce"]):
        raise InvalidAssertion("assertion nonce is not 32 lowercase hex characters")
    if not isinstance(document["pseudonym"], str) or not _PSEUDONYM.fullmatch(
        document["pseudonym"]
    ):
        raise InvalidAssertion(
            f"assertion pseudonym is not {2 * PSEUDONYM_LENGTH} lowercase hex characters"
        )
    document["pseudonym"] = bytes.fromhex(document["pseudonym"])
    return RequesterAssertion(**document)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a field appears twice")
    return document
