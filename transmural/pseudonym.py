"""The network pseudonym: what the registry knows a patient by.

``HMAC-SHA256(network_key, "<system>|<value>")`` over the canonical
identifier. Every node of a network holds the same key, so every node
computes the same pseudonym for one patient; the registry, which never
sees the key's input, cannot turn a pseudonym back into an identifier.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from transmural.errors import ConfigError
from transmural.identifiers import Identifier

PSEUDONYM_LENGTH = 32
MIN_KEY_LENGTH = 32
KEY_CHECK_MESSAGE = b"transmural network key check"


class Pseudonymiser:
    """Computes pseudonyms under one network key."""

    def __init__(self, network_key: bytes) -> None:
        if len(network_key) < MIN_KEY_LENGTH:
            raise ConfigError(f"the network key must be at least {MIN_KEY_LENGTH} bytes")
        self._key = network_key

    def pseudonym(self, identifier: Identifier) -> bytes:
        """32-byte pseudonym of a canonical identifier."""
        return hmac.new(self._key, identifier.token.encode("utf-8"), hashlib.sha256).digest()


def key_check(network_key: bytes) -> bytes:
    """What shows two parties hold the same network key without showing the key.

    A node that registers with another check than the registry's holds a key
    from elsewhere: every pseudonym it publishes would be unfindable.
    """
    return hmac.new(network_key, KEY_CHECK_MESSAGE, hashlib.sha256).digest()


def is_pseudonym(value: bytes) -> bool:
    """True when ``value`` has the shape of a pseudonym (32 bytes)."""
    return len(value) == PSEUDONYM_LENGTH


def new_network_key() -> bytes:
    """A fresh random network key (32 bytes)."""
    return os.urandom(MIN_KEY_LENGTH)


def write_network_key(path: Path, key: bytes) -> None:
    """Write the key as hex, readable by its owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.hex() + "\n")
    os.chmod(path, 0o600)


def read_network_key(path: Path) -> bytes:
    """Read a key written by ``write_network_key``; ConfigError if unusable."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except OSError as error:
        raise ConfigError(f"cannot read the network key {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the network key {path} is not hex text") from None
    if mode & 0o077:
        raise ConfigError(
            f"the network key {path} is readable by others (mode {mode & 0o777:o}): "
            f"chmod 600 {path}"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"the network key {path} is not hex text") from None
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"the network key {path} is shorter than {MIN_KEY_LENGTH} bytes")
    return key
