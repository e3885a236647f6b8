"""Wrap a secret for one node's public key (ECIES on P-256).

The registry hands the network pseudonymisation key to a joining node in
its Join answer. The node's private key never leaves the node, so the
registry encrypts the secret to the public key in the node's CSR: only
that node can read it, even if the answer is logged or the join channel
is later found weak.

Wire form, version 1::

    0x01 || ephemeral public key (65 bytes, uncompressed) || nonce (12) || ciphertext+tag

The AES-256-GCM key is HKDF-SHA256 over the ECDH secret of a fresh
ephemeral key and the recipient key, salted with the ephemeral public key
(so each key belongs to one exchange) with ``context`` as info; ``context``
is also the GCM associated data. A secret wrapped for one purpose therefore
never unwraps for another.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from transmural.errors import InvalidInput

#: The context under which the registry wraps the network key (see enrolment.proto).
NETWORK_KEY_CONTEXT = b"transmural network key"

VERSION = 1
_POINT_BYTES = 65
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_BYTES = 1 + _POINT_BYTES + _NONCE_BYTES


def wrap_for(public_key: ec.EllipticCurvePublicKey, secret: bytes, context: bytes) -> bytes:
    """``secret`` encrypted so that only the holder of ``public_key``'s private key reads it."""
    _require_p256(public_key.curve, "the recipient key")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key = _derive(ephemeral.exchange(ec.ECDH(), public_key), point, context)
    nonce = os.urandom(_NONCE_BYTES)
    return bytes([VERSION]) + point + nonce + AESGCM(key).encrypt(nonce, secret, context)


def unwrap_with(private_key: ec.EllipticCurvePrivateKey, wrapped: bytes, context: bytes) -> bytes:
    """The secret ``wrap_for`` sealed; InvalidInput if it is damaged or not for this key."""
    _require_p256(private_key.curve, "the private key")
    if len(wrapped) < _HEADER_BYTES + _TAG_BYTES:
        raise InvalidInput(
            f"the wrapped secret is too short ({len(wrapped)} bytes, "
            f"at least {_HEADER_BYTES + _TAG_BYTES} expected)"
        )
    if wrapped[0] != VERSION:
        raise InvalidInput(
            f"the wrapped secret has unknown version {wrapped[0]} (expected {VERSION})"
        )
    point = wrapped[1 : 1 + _POINT_BYTES]
    nonce = wrapped[1 + _POINT_BYTES : _HEADER_BYTES]
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise InvalidInput(
            "the wrapped secret's ephemeral public key is not a P-256 point"
        ) from None
    key = _derive(private_key.exchange(ec.ECDH(), ephemeral), point, context)
    try:
        return AESGCM(key).decrypt(nonce, wrapped[_HEADER_BYTES:], context)
    except InvalidTag:
        raise InvalidInput(
            "the wrapped secret does not open with this key and context "
            "(wrapped for another key or purpose, or damaged)"
        ) from None


def _derive(shared: bytes, point: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=point, info=context).derive(shared)


def _require_p256(curve: ec.EllipticCurve, what: str) -> None:
    if not isinstance(curve, ec.SECP256R1):
        raise InvalidInput(f"{what} must be ECDSA P-256, not {curve.name}")
