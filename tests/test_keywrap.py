"""Key wrapping: only the joining node can read the network key it is sent."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from transmural.errors import InvalidInput
from transmural.keywrap import NETWORK_KEY_CONTEXT, unwrap_with, wrap_for

SECRET = bytes(range(32))


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_round_trip(key: ec.EllipticCurvePrivateKey) -> None:
    wrapped = wrap_for(key.public_key(), SECRET, NETWORK_KEY_CONTEXT)
    assert len(wrapped) == 1 + 65 + 12 + len(SECRET) + 16
    assert wrapped[0] == 1
    assert SECRET not in wrapped
    assert unwrap_with(key, wrapped, NETWORK_KEY_CONTEXT) == SECRET


def test_each_wrap_is_fresh(key: ec.EllipticCurvePrivateKey) -> None:
    first = wrap_for(key.public_key(), SECRET, NETWORK_KEY_CONTEXT)
    second = wrap_for(key.public_key(), SECRET, NETWORK_KEY_CONTEXT)
    assert first != second
    assert first[1:66] != second[1:66]  # a new ephemeral key each time


def test_empty_secret_round_trips(key: ec.EllipticCurvePrivateKey) -> None:
    assert unwrap_with(key, wrap_for(key.public_key(), b"", b"ctx"), b"ctx") == b""


def test_wrong_key_refused(key: ec.EllipticCurvePrivateKey) -> None:
    wrapped = wrap_for(key.public_key(), SECRET, NETWORK_KEY_CONTEXT)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidInput, match="does not open with this key and context"):
        unwrap_with(other, wrapped, NETWORK_KEY_CONTEXT)


def test_wrong_context_refused(key: ec.EllipticCurvePrivateKey) -> None:
    wrapped = wrap_for(key.public_key(), SECRET, NETWORK_KEY_CONTEXT)
    with pytest.raises(InvalidInput, match="does not open"):
        unwrap_with(key, wrapped, b"something else")


@pytest.mark.parametrize("position", [66, 70, 78, -1])  # nonce, ciphertext, tag
def test_flipped_byte_refused(key: ec.EllipticCurvePrivateKey, position: int) -> None:
    wrapped = bytearray(wrap_for(key.public_key(), SECRET, NETWORK_KEY_CONTEXT))
    wrapped[position] ^= 0x01
    with pytest.raises(InvalidInput, match="does not open"):
        unwrap_with(key, bytes(wrapped), NETWORK_KEY_CONTEXT)


def test_flipped_ephemeral_key_refused(key: ec.EllipticCurvePrivateKey) -> None:
    wrapped = bytearray(wrap_for(key.public_key(), SECRET, NETWORK_KEY_CONTEXT))
    wrapped[10] ^= 0x01  # almost surely no longer a point on the curve
    with pytest.raises(InvalidInput, match="wrapped secret"):
        unwrap_with(key, bytes(wrapped), NETWORK_KEY_CONTEXT)


def test_unknown_version_refused(key: ec.EllipticCurvePrivateKey) -> None:
    wrapped = wrap_for(key.public_key(), SECRET, NETWORK_KEY_CONTEXT)
    with pytest.raises(InvalidInput, match="unknown version 2"):
        unwrap_with(key, b"\x02" + wrapped[1:], NETWORK_KEY_CONTEXT)


@pytest.mark.parametrize("length", [0, 1, 66, 78, 93])
def test_truncated_refused(key: ec.EllipticCurvePrivateKey, length: int) -> None:
    wrapped = wrap_for(key.public_key(), SECRET, NETWORK_KEY_CONTEXT)
    with pytest.raises(InvalidInput, match="too short"):
        unwrap_with(key, wrapped[:length], NETWORK_KEY_CONTEXT)


def test_truncated_ciphertext_refused(key: ec.EllipticCurvePrivateKey) -> None:
    wrapped = wrap_for(key.public_key(), SECRET, NETWORK_KEY_CONTEXT)
    with pytest.raises(InvalidInput, match="does not open"):
        unwrap_with(key, wrapped[:-1], NETWORK_KEY_CONTEXT)


def test_other_curve_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(InvalidInput, match="P-256"):
        wrap_for(p384.public_key(), SECRET, NETWORK_KEY_CONTEXT)
