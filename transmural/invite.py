"""The one-time invite token an operator hands a facility (DESIGN flow 2).

It carries what a node needs to join safely before it trusts anything:
where the registry's join port is (or "" to find it on the LAN), the
fingerprint of the network CA (to check the registry it finds), and the
one-time secret that authenticates the ``Join`` call. The registry keeps
only ``secret_hash``; it, not this module, enforces expiry and single use
with its own clock and records.

Text form, meant to survive e-mail and copy-paste::

    tmi2.<base64url, no padding, of compact JSON>.<first 8 hex of SHA-256 of the base64 part>

JSON keys are short to keep the token short: ``r`` registry, ``f`` CA
fingerprint, ``s`` secret (base64url), ``e`` expiry (epoch seconds), and
``n`` the node id the registry will give. ``n`` lets a node that must have
a given id refuse another node's token before the one-time join uses it
up; the registry's own record, not the token, decides the id.

The prefix is the version, and a new field means a new version: an older
Transmural, which reads only ``tmi1``, then says that the token is of a
newer version instead of calling it malformed. A token that names its node
is ``tmi2`` (``n`` required); one that does not is written as ``tmi1``
(``r f s e``), which every Transmural reads. ``tmi1`` tokens that carry
``n`` (written for a while before the version was raised) are still read.

The checksum catches a token damaged in transit; it is no defence against a
forger, who gains nothing anyway: a changed secret is refused by the
registry and a changed fingerprint makes the node refuse the registry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field

from transmural.errors import InvalidInput

#: The version of a token that names its node, and of one that does not (older readers).
PREFIX = "tmi2"
PREFIX_WITHOUT_NODE = "tmi1"
SECRET_BYTES = 32
DEFAULT_TTL_S = 24 * 3600

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
#: host:port, where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_CHECKSUM = re.compile(r"[0-9a-fA-F]{8}")
_OTHER_VERSION = re.compile(r"tmi\d+")
_NODE_ID = re.compile(r"[a-z0-9-]{1,64}")  # as the registry's node ids
#: The fields each version reads: (required, optional).
_FIELDS = {
    PREFIX_WITHOUT_NODE: ({"r", "f", "s", "e"}, {"n"}),
    PREFIX: ({"r", "f", "s", "e", "n"}, set()),
}
_READS = " and ".join(repr(version) for version in _FIELDS)
_SHAPE = f"expected {PREFIX}.<payload>.<checksum>"


@dataclass(frozen=True, slots=True)
class InviteToken:
    """A valid invite; construction refuses bad field values with InvalidInput."""

    registry: str  # "host:port" of the registry's join port, or "" to find it on the LAN
    ca_fingerprint: str  # 64 lowercase hex: SHA-256 of the CA certificate (DER)
    secret: bytes = field(repr=False)  # 32 random bytes; kept out of logs
    expires_at: int  # epoch seconds
    node_id: str = ""  # the id the node will get; "" in tokens made before it was carried

    def __post_init__(self) -> None:
        if self.registry and not _valid_address(self.registry):
            raise InvalidInput(
                f"the invite token's registry address {self.registry!r} is not host:port"
            )
        if not _FINGERPRINT.fullmatch(self.ca_fingerprint):
            raise InvalidInput(
                "the invite token's CA fingerprint is not 64 lowercase hex characters"
            )
        if not isinstance(self.secret, bytes) or len(self.secret) != SECRET_BYTES:
            raise InvalidInput(f"the invite token's secret is not {SECRET_BYTES} bytes")
        if type(self.expires_at) is not int or self.expires_at <= 0:
            raise InvalidInput("the invite token's expiry is not a positive whole number")
        if self.node_id and not _NODE_ID.fullmatch(self.node_id):
            raise InvalidInput(
                "the invite token's node id is not 1-64 lowercase letters, digits and '-'"
            )


def new_token(
    registry: str, ca_fingerprint: str, now: float, ttl_s: int = DEFAULT_TTL_S, node_id: str = ""
) -> InviteToken:
    """A fresh token with a random secret, valid for ``ttl_s`` seconds from ``now``."""
    if ttl_s <= 0:
        raise InvalidInput(f"an invite must be valid for a positive time, not {ttl_s} s")
    return InviteToken(
        registry=registry.strip(),
        ca_fingerprint=ca_fingerprint.strip().lower(),
        secret=os.urandom(SECRET_BYTES),
        expires_at=int(now) + ttl_s,
        node_id=node_id,
    )


def encode(token: InviteToken) -> str:
    """The single copy-pasteable string a facility admin gives to ``join``."""
    document = {
        "r": token.registry,
        "f": token.ca_fingerprint,
        "s": _b64encode(token.secret),
        "e": token.expires_at,
    }
    version = PREFIX_WITHOUT_NODE
    if token.node_id:
        document["n"] = token.node_id
        version = PREFIX
    payload = _b64encode(json.dumps(document, separators=(",", ":")).encode("ascii"))
    return f"{version}.{payload}.{_checksum(payload)}"


def decode(text: str) -> InviteToken:
    """Parse a pasted token (whitespace anywhere ignored); InvalidInput says what is wrong."""
    parts = "".join(text.split()).split(".")
    if len(parts) != 3 or parts[0] not in _FIELDS or not _CHECKSUM.fullmatch(parts[2]):
        if _OTHER_VERSION.fullmatch(parts[0]) and parts[0] not in _FIELDS:
            raise InvalidInput(
                f"this invite token is of version {parts[0]!r}; this Transmural reads {_READS}"
            )
        raise InvalidInput(f"this is not a Transmural invite token ({_SHAPE})")
    version, payload, checksum = parts
    if not _BASE64URL.fullmatch(payload) or _checksum(payload) != checksum.lower():
        raise InvalidInput(
            "the invite token is damaged (its checksum does not match): copy the whole token again"
        )
    try:
        document = json.loads(_b64decode(payload))
    except (ValueError, binascii.Error):
        raise InvalidInput("the invite token is damaged: its payload cannot be decoded") from None
    required, optional = _FIELDS[version]
    if not isinstance(document, dict) or not required <= set(document) <= required | optional:
        raise InvalidInput("the invite token's payload does not have the fields of an invite")
    if not all(isinstance(document.get(k, ""), str) for k in "rfsn"):
        raise InvalidInput("the invite token's payload has fields of the wrong type")
    if version == PREFIX and not document["n"]:
        raise InvalidInput(f"the invite token's node id is empty (a {PREFIX} token needs one)")
    try:
        secret = _b64decode(document["s"])
    except (ValueError, binascii.Error):
        raise InvalidInput("the invite token's secret is not base64url") from None
    return InviteToken(
        registry=document["r"],
        ca_fingerprint=document["f"],
        secret=secret,
        expires_at=document["e"],
        node_id=document.get("n", ""),
    )


def secret_hash(secret: bytes) -> bytes:
    """SHA-256 of the secret: what the registry stores, so a database leak admits no one."""
    return hashlib.sha256(secret).digest()


def expired(token: InviteToken, now: float) -> bool:
    """True once ``now`` reaches the expiry: lets the CLI warn before dialling the registry."""
    return now >= token.expires_at


def check_join_address(address: str) -> str:
    """``address`` if a joining node can dial it as the registry's join port; InvalidInput if not.

    Stricter than what a token may carry when read: a wildcard (0.0.0.0, [::])
    is where a server listens, never where a node dials, and all-digit
    dotted hosts must be real IPv4 addresses (999.1.1.1 is no DNS name either).
    """
    if not _valid_address(address):
        raise InvalidInput(
            f"the join address {address!r} is not host:port "
            "(a DNS name, IPv4 or [IPv6] address, port 1-65535)"
        )
    host = address.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if re.fullmatch(r"[0-9.]+", host):
            raise InvalidInput(f"the join address {address!r} has no valid IPv4 address") from None
        return address
    if ip.is_unspecified:
        raise InvalidInput(
            f"the join address {address!r} is where the registry listens, not an address a "
            "node can dial: give the registry's host name or IP address"
        )
    return address


def _valid_address(address: str) -> bool:
    match = _ADDRESS.fullmatch(address)
    return match is not None and 1 <= int(match.group(1)) <= 65535


def _checksum(payload: str) -> str:
    return hashlib.sha256(payload.encode("ascii")).hexdigest()[:8]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    # validate=True: refuse characters outside the alphabet instead of skipping them.
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
