"""Invite tokens: one pasteable string that survives e-mail and says clearly what is wrong."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from transmural.errors import InvalidInput
from transmural.invite import (
    InviteToken,
    decode,
    encode,
    expired,
    new_token,
    secret_hash,
)

FINGERPRINT = "ab" * 32
NOW = 1_700_000_000


def forge(document: object, version: str = "tmi1") -> str:
    """A well-formed token (correct checksum) around any JSON document."""
    payload = base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()
    return f"{version}.{payload}.{hashlib.sha256(payload.encode()).hexdigest()[:8]}"


def payload_of(text: str) -> dict[str, object]:
    payload = text.split(".")[1]
    document: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return document


def fields(**changes: object) -> dict[str, object]:
    document: dict[str, object] = {"r": "registry.example:7443", "f": FINGERPRINT, "e": NOW}
    document["s"] = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
    document.update(changes)
    return document


def test_round_trip() -> None:
    token = new_token("registry.example:7443", FINGERPRINT, NOW)
    text = encode(token)
    assert text.startswith("tmi1.")
    assert decode(text) == token
    assert token.expires_at == NOW + 24 * 3600
    assert len(token.secret) == 32


def test_node_id_carried_and_tokens_without_it_still_read() -> None:
    token = new_token("registry.example:7443", FINGERPRINT, NOW, node_id="huisarts-7")
    assert decode(encode(token)).node_id == "huisarts-7"
    older = decode(forge(fields()))  # made before tokens named their node
    assert older.node_id == "" and older.expires_at == NOW


def test_a_token_naming_its_node_is_a_new_version() -> None:
    # An older Transmural reads tmi1 with exactly r, f, s, e: a new field under
    # that prefix made it say "not the fields of an invite"; another prefix
    # makes it say the token is of a newer version.
    named = encode(new_token("registry.example:7443", FINGERPRINT, NOW, node_id="huisarts-7"))
    assert named.startswith("tmi2.") and set(payload_of(named)) == {"r", "f", "s", "e", "n"}
    plain = encode(new_token("registry.example:7443", FINGERPRINT, NOW))
    assert plain.startswith("tmi1.") and set(payload_of(plain)) == {"r", "f", "s", "e"}


def test_both_versions_read() -> None:
    token = decode(forge(fields(n="huisarts-7"), "tmi2"))
    assert token.node_id == "huisarts-7" and token.expires_at == NOW
    # tmi1 with n: written for a while before the version was raised.
    assert decode(forge(fields(n="huisarts-7"))).node_id == "huisarts-7"
    with pytest.raises(InvalidInput, match="does not have the fields of an invite"):
        decode(forge(fields(), "tmi2"))  # a tmi2 token names its node
    with pytest.raises(InvalidInput, match="node id is empty"):
        decode(forge(fields(n=""), "tmi2"))


def test_round_trip_lan_discovery_and_ipv6() -> None:
    for registry in ("", "[::1]:7443", "10.0.0.5:1"):
        token = new_token(registry, FINGERPRINT, NOW, ttl_s=60)
        assert decode(encode(token)) == token


def test_fingerprint_normalised_to_lowercase() -> None:
    assert new_token("", FINGERPRINT.upper(), NOW).ca_fingerprint == FINGERPRINT


def test_tokens_differ_and_hide_secret_in_repr() -> None:
    first, second = new_token("", FINGERPRINT, NOW), new_token("", FINGERPRINT, NOW)
    assert first.secret != second.secret
    assert first.secret.hex() not in repr(first) and repr(first.secret) not in repr(first)


def test_secret_hash_is_sha256() -> None:
    token = new_token("", FINGERPRINT, NOW)
    assert secret_hash(token.secret) == hashlib.sha256(token.secret).digest()
    assert len(secret_hash(token.secret)) == 32


def test_whitespace_and_newlines_ignored() -> None:
    token = new_token("registry.example:7443", FINGERPRINT, NOW)
    text = encode(token)
    pasted = "\n  " + "\n".join(text[i : i + 20] for i in range(0, len(text), 20)) + " \t\r\n"
    assert decode(pasted) == token


def test_tampered_payload_fails_checksum() -> None:
    text = encode(new_token("registry.example:7443", FINGERPRINT, NOW))
    prefix, payload, checksum = text.split(".")
    flipped = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    with pytest.raises(InvalidInput, match=r"damaged .*checksum does not match"):
        decode(f"{prefix}.{flipped}.{checksum}")
    with pytest.raises(InvalidInput, match="checksum does not match"):
        decode(f"{prefix}.{payload[:-1]}.{checksum}")  # cut short in transit
    with pytest.raises(InvalidInput, match="checksum does not match"):
        decode(f"{prefix}.{payload}.00000000")


def test_undecodable_payload_is_damaged() -> None:
    payload = "____"  # base64url of bytes that are not JSON
    checksum = hashlib.sha256(payload.encode()).hexdigest()[:8]
    with pytest.raises(InvalidInput, match="payload cannot be decoded"):
        decode(f"tmi1.{payload}.{checksum}")


@pytest.mark.parametrize(
    "text",
    ["", "hello", "tmi1", "tmi1.abc", "tmi1.abc.def.ghi", "xyz1.abc.12345678", "tmi1.abc.nothex!!"],
)
def test_not_an_invite_token(text: str) -> None:
    with pytest.raises(InvalidInput, match="not a Transmural invite token"):
        decode(text)


@pytest.mark.parametrize("version", ["tmi3", "tmi10", "tmi0"])
def test_other_version_named(version: str) -> None:
    with pytest.raises(
        InvalidInput, match=f"version '{version}'; this Transmural reads 'tmi1' and 'tmi2'"
    ):
        decode(f"{version}.abc.12345678")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (fields(f="ab" * 31), "CA fingerprint is not 64 lowercase hex"),
        (fields(f="AB" * 32), "CA fingerprint is not 64 lowercase hex"),
        (fields(f="zz" * 32), "CA fingerprint is not 64 lowercase hex"),
        (fields(s=base64.urlsafe_b64encode(bytes(16)).decode()), "secret is not 32 bytes"),
        (fields(s="not base64!"), "secret is not base64url"),
        (fields(r="registry.example"), "'registry.example' is not host:port"),
        (fields(r="registry.example:0"), "is not host:port"),
        (fields(r="registry.example:70000"), "is not host:port"),
        (fields(r="::1:7443"), "is not host:port"),
        (fields(r="bad host:7443"), "is not host:port"),
        (fields(e=-1), "expiry is not a positive whole number"),
        (fields(e=1.5), "expiry is not a positive whole number"),
        (fields(e=True), "expiry is not a positive whole number"),
        (fields(r=7443), "fields of the wrong type"),
        (fields(n=7), "fields of the wrong type"),
        (fields(n="Node 1"), "node id is not 1-64 lowercase"),
        ({"r": "", "f": FINGERPRINT}, "does not have the fields of an invite"),
        (fields(x=1), "does not have the fields of an invite"),
        ([1, 2, 3], "does not have the fields of an invite"),
    ],
)
def test_bad_fields(document: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode(forge(document))


def test_new_token_refuses_bad_values() -> None:
    with pytest.raises(InvalidInput, match="not host:port"):
        new_token("registry.example", FINGERPRINT, NOW)
    with pytest.raises(InvalidInput, match="fingerprint"):
        new_token("", "abc", NOW)
    with pytest.raises(InvalidInput, match="positive time"):
        new_token("", FINGERPRINT, NOW, ttl_s=0)
    with pytest.raises(InvalidInput, match="secret"):
        InviteToken("", FINGERPRINT, b"short", NOW)


def test_expired() -> None:
    token = new_token("", FINGERPRINT, NOW, ttl_s=60)
    assert not expired(token, NOW)
    assert not expired(token, NOW + 59.9)
    assert expired(token, NOW + 60)
    assert expired(token, NOW + 3600)
