"""Requester assertions: each way an assertion can be wrong is refused with its own status."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from transmural import errors
from transmural.assertion import (
    AssertionVerifier,
    RequesterAssertion,
    new_assertion,
    sign,
)
from transmural.errors import (
    AssertionExpired,
    AssertionIssuerMismatch,
    AssertionRejected,
    AssertionReplayed,
    AssertionSignatureInvalid,
    AssertionWrongAudience,
    InvalidAssertion,
    ReplayCacheFull,
)
from transmural.pki import CertificateIdentity

T0 = 1_700_000_000.0
PSEUDONYM = bytes.fromhex("5e" * 32)
CALLER = CertificateIdentity(
    node_id="node-1",
    organisation_id="URA-1",
    organisation_name="Hospital One",
    serial="1f",
    not_after=datetime(2030, 1, 1, tzinfo=UTC),
)


class FakeClock:
    """Time that moves only when a test moves it."""

    def __init__(self, now: float = T0) -> None:
        self._now = now

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - T0

    def advance(self, seconds: float) -> None:
        self._now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def verifier(clock: FakeClock) -> AssertionVerifier:
    return AssertionVerifier("node-2", clock)


def make(**changes: Any) -> RequesterAssertion:
    values: dict[str, Any] = {
        "issuer": "node-1",
        "organisation_id": "URA-1",
        "clinician_id": "uzi-123",
        "display_name": "Dr. A. Arts",
        "role": "physician",
        "purpose_of_use": "treatment",
        "pseudonym": PSEUDONYM,
        "audience": "node-2",
        "now": T0,
    }
    values.update(changes)
    return new_assertion(**values)


def verify(
    verifier: AssertionVerifier,
    key: ec.EllipticCurvePrivateKey,
    assertion: RequesterAssertion,
    caller: CertificateIdentity = CALLER,
) -> RequesterAssertion:
    payload, signature = sign(assertion, key)
    return verifier.verify(payload, signature, caller, key.public_key())


def resign(document: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    payload = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return payload, key.sign(payload, ec.ECDSA(hashes.SHA256()))


def document_of(assertion: RequesterAssertion, key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(sign(assertion, key)[0])
    return document


# --- the good case ---


def test_valid_assertion_passes(
    verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey
) -> None:
    assertion = make()
    assert verify(verifier, key, assertion) == assertion


def test_organisation_and_display_name_may_be_empty(
    clock: FakeClock, key: ec.EllipticCurvePrivateKey
) -> None:
    """A certificate without an organisation id (dev setups) still matches an empty one."""
    caller = CertificateIdentity("node-1", "", "", "1f", CALLER.not_after)
    assertion = make(organisation_id="", display_name="")
    assert verify(AssertionVerifier("node-2", clock), key, assertion, caller) == assertion


def test_new_assertion_fields() -> None:
    assertion = make(lifetime_s=60)
    assert (assertion.issued_at, assertion.expires_at) == (int(T0), int(T0) + 60)
    assert len(assertion.nonce) == 32 and int(assertion.nonce, 16) >= 0
    assert make().nonce != make().nonce
    assert PSEUDONYM.hex() not in repr(assertion)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"role": ""}, "field role is empty"),
        ({"issuer": ""}, "field issuer is empty"),
        ({"pseudonym": b"short"}, "pseudonym is not 64 lowercase hex"),
        ({"lifetime_s": 0}, "expires before it is issued"),
    ],
)
def test_new_assertion_refuses_what_peers_would(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidAssertion, match=message):
        make(**changes)


def test_payload_is_canonical_json(key: ec.EllipticCurvePrivateKey) -> None:
    payload, signature = sign(make(), key)
    document = json.loads(payload)
    assert payload == json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    assert document["pseudonym"] == PSEUDONYM.hex()
    assert signature[0] == 0x30  # DER ECDSA signature


# --- each failure: its own class, its own status code ---


def test_error_classes_have_distinct_real_grpc_codes() -> None:
    classes = [
        InvalidAssertion,
        AssertionSignatureInvalid,
        AssertionIssuerMismatch,
        AssertionWrongAudience,
        AssertionExpired,
        AssertionReplayed,
        ReplayCacheFull,
    ]
    codes = [cls.grpc_code for cls in classes]
    assert len(set(codes)) == len(codes)
    assert all(isinstance(getattr(grpc.StatusCode, code), grpc.StatusCode) for code in codes)
    assert all(issubclass(cls, errors.TransmuralError) for cls in classes)
    assert all(issubclass(cls, AssertionRejected) for cls in classes[:-1])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"x" * 5000, "over 4096 bytes"),
        (b'{"a": 1, "a": 2}', "not JSON: a field appears twice"),
    ],
)
def test_malformed_payload(
    verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey, payload: bytes, message: str
) -> None:
    signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidAssertion, match=message) as caught:
        verifier.verify(payload, signature, CALLER, key.public_key())
    assert caught.value.grpc_code == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"role": None}, "missing \\['role'\\]"),
        ({"extra": "x"}, "unknown \\['extra'\\]"),
        ({"role": ""}, "field role is empty"),
        ({"audience": 2}, "field audience is not a string"),
        ({"display_name": None}, "missing \\['display_name'\\]"),
        ({"issued_at": "now"}, "field issued_at is not whole epoch seconds"),
        ({"expires_at": 1.5}, "field expires_at is not whole epoch seconds"),
        ({"expires_at": True}, "field expires_at is not whole epoch seconds"),
        ({"expires_at": int(T0)}, "expires before it is issued"),
        ({"nonce": "abc"}, "nonce is not 32 lowercase hex"),
        ({"nonce": 7}, "nonce is not 32 lowercase hex"),
        ({"pseudonym": "5e" * 31}, "pseudonym is not 64 lowercase hex"),
        ({"pseudonym": "XY" * 32}, "pseudonym is not 64 lowercase hex"),
    ],
)
def test_bad_fields_are_malformed(
    verifier: AssertionVerifier,
    key: ec.EllipticCurvePrivateKey,
    changes: dict[str, Any],
    message: str,
) -> None:
    document = document_of(make(), key)
    for name, value in changes.items():
        if value is None:
            del document[name]
        else:
            document[name] = value
    payload, signature = resign(document, key)
    with pytest.raises(InvalidAssertion, match=message) as caught:
        verifier.verify(payload, signature, CALLER, key.public_key())
    assert PSEUDONYM.hex() not in str(caught.value)


def test_signature_by_another_key(
    verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    payload, signature = sign(make(), other)
    with pytest.raises(AssertionSignatureInvalid, match="caller's certificate key") as caught:
        verifier.verify(payload, signature, CALLER, key.public_key())
    assert caught.value.grpc_code == "UNAUTHENTICATED"


@pytest.mark.parametrize("signature", [b"", b"\x30\x00", b"garbage"])
def test_garbage_signature(
    verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey, signature: bytes
) -> None:
    payload, _ = sign(make(), key)
    with pytest.raises(AssertionSignatureInvalid):
        verifier.verify(payload, signature, CALLER, key.public_key())


def test_payload_changed_after_signing(
    verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey
) -> None:
    payload, signature = sign(make(role="nurse"), key)
    forged = payload.replace(b'"role":"nurse"', b'"role":"physician"')
    with pytest.raises(AssertionSignatureInvalid):
        verifier.verify(forged, signature, CALLER, key.public_key())


def test_issuer_is_not_the_caller(
    verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(
        AssertionIssuerMismatch,
        match="assertion was issued by node-9, but the caller's certificate is node-1",
    ) as caught:
        verify(verifier, key, make(issuer="node-9"))
    assert caught.value.grpc_code == "PERMISSION_DENIED"


def test_organisation_is_not_the_callers(
    verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(AssertionIssuerMismatch, match=r"names organisation URA-9, but .* URA-1"):
        verify(verifier, key, make(organisation_id="URA-9"))


def test_wrong_audience(verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(AssertionWrongAudience, match="assertion is for node-3, not node-2") as c:
        verify(verifier, key, make(audience="node-3"))
    assert c.value.grpc_code == "FAILED_PRECONDITION"


def test_expired(
    verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    assertion = make(lifetime_s=120)
    clock.advance(120 + 30 + 12)
    with pytest.raises(AssertionExpired, match="assertion expired 42 s ago") as caught:
        verify(verifier, key, assertion)
    assert caught.value.grpc_code == "OUT_OF_RANGE"


def test_issued_in_the_future(verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(AssertionExpired, match="issued 31 s in the future"):
        verify(verifier, key, make(now=T0 + 31))


def test_lifetime_too_long(verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(AssertionExpired, match="valid for 301 s, longer than the 300 s"):
        verify(verifier, key, make(lifetime_s=301))
    assert verify(verifier, key, make(lifetime_s=300))


def test_clock_skew_boundaries(
    verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    """Up to 30 s of clock difference either way is accepted; a moment more is not."""
    assert verify(verifier, key, make(now=T0 + 30))  # issued 30 s ahead of this clock
    with pytest.raises(AssertionExpired, match="issued 31 s in the future"):
        verify(verifier, key, make(now=T0 + 31))
    assert verify(verifier, key, make(now=T0 - 150, lifetime_s=120))  # expired 30 s ago
    clock.advance(0.5)
    with pytest.raises(AssertionExpired, match=r"expired 31 s ago \(allowed clock skew 30 s\)"):
        verify(verifier, key, make(now=T0 - 150, lifetime_s=120))


def test_checks_run_in_order(verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey) -> None:
    """Wrong in every way: the signature is reported first, then issuer, audience, time."""
    other = ec.generate_private_key(ec.SECP256R1())
    everything_wrong = make(issuer="node-9", audience="node-3", now=T0 - 3600)
    payload, signature = sign(everything_wrong, other)
    with pytest.raises(AssertionSignatureInvalid):
        verifier.verify(payload, signature, CALLER, key.public_key())
    with pytest.raises(AssertionIssuerMismatch):
        verify(verifier, key, everything_wrong)
    with pytest.raises(AssertionWrongAudience):
        verify(verifier, key, make(audience="node-3", now=T0 - 3600))
    with pytest.raises(AssertionExpired):
        verify(verifier, key, make(now=T0 - 3600))


# --- replay ---


def test_replay_refused(verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey) -> None:
    payload, signature = sign(make(), key)
    verifier.verify(payload, signature, CALLER, key.public_key())
    with pytest.raises(AssertionReplayed, match="already used") as caught:
        verifier.verify(payload, signature, CALLER, key.public_key())
    assert caught.value.grpc_code == "ALREADY_EXISTS"
    assert PSEUDONYM.hex() not in str(caught.value)


def test_same_nonce_accepted_by_another_verifier(
    clock: FakeClock, key: ec.EllipticCurvePrivateKey
) -> None:
    payload, signature = sign(make(), key)
    for verifier in (AssertionVerifier("node-2", clock), AssertionVerifier("node-2", clock)):
        verifier.verify(payload, signature, CALLER, key.public_key())


def test_nonce_recorded_only_after_every_check(
    verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    assertion = make(now=T0 + 60)  # too far in the future for now
    with pytest.raises(AssertionExpired):
        verify(verifier, key, assertion)
    clock.advance(60)
    assert verify(verifier, key, assertion) == assertion


def test_replay_refused_until_assertion_could_not_pass_anyway(
    verifier: AssertionVerifier, key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    payload, signature = sign(make(lifetime_s=120), key)
    verifier.verify(payload, signature, CALLER, key.public_key())
    clock.advance(150)  # the last moment the time check still passes
    with pytest.raises(AssertionReplayed):
        verifier.verify(payload, signature, CALLER, key.public_key())
    clock.advance(1)
    with pytest.raises(AssertionExpired):
        verifier.verify(payload, signature, CALLER, key.public_key())


def test_full_cache_refuses_rather_than_evicting(
    clock: FakeClock, key: ec.EllipticCurvePrivateKey
) -> None:
    verifier = AssertionVerifier("node-2", clock, max_nonces=3)
    first = sign(make(lifetime_s=10), key)
    verifier.verify(*first, CALLER, key.public_key())
    for _ in range(2):
        verify(verifier, key, make(lifetime_s=100))
    with pytest.raises(ReplayCacheFull, match="retry shortly") as caught:
        verify(verifier, key, make())
    assert caught.value.grpc_code == "RESOURCE_EXHAUSTED"
    with pytest.raises(AssertionReplayed):  # a replay is still reported as a replay
        verifier.verify(*first, CALLER, key.public_key())
    clock.advance(10 + 30 + 1)  # the first nonce's assertion can no longer pass
    assert verify(verifier, key, make(now=clock.now()))
