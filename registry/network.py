"""The operator's network folder: the network CA, the registry's identity, the network key.

``transmural-admin network init`` makes it once (DESIGN flow 1); the
registry and the admin CLI's ``invite`` read it. It holds every secret of
the network, so the folder is owner-only (0700) and each private file is
0600 from its first byte::

    ca.key        network CA private key (signs node certificates)
    ca.crt        network CA certificate (its fingerprint goes into invites)
    registry.key  the registry's TLS key
    registry.crt  the registry's TLS certificate (carries ca.crt for bootstrap)
    network.key   the network pseudonymisation key (handed, wrapped, to joining nodes)

An existing network is never overwritten: a second ``init`` on the same
folder would orphan every node that joined the first.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from transmural import pki, transport
from transmural.errors import ConfigError, InvalidInput
from transmural.pseudonym import new_network_key, read_network_key, write_network_key

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
REGISTRY_KEY = "registry.key"
REGISTRY_CERT = "registry.crt"
NETWORK_KEY = "network.key"
FILES = (CA_KEY, CA_CERT, REGISTRY_KEY, REGISTRY_CERT, NETWORK_KEY)

MAX_NETWORK_NAME_LENGTH = 64


@dataclass(frozen=True, slots=True)
class NetworkFiles:
    """A loaded network folder: what the registry serves and signs with."""

    folder: Path
    ca_key: pki.PrivateKey
    ca_cert: x509.Certificate
    tls: transport.TlsFiles  # the registry's certificate and key, with the CA
    network_key: bytes

    @property
    def ca_fingerprint(self) -> str:
        return pki.fingerprint(self.ca_cert)

    @property
    def name(self) -> str:
        """The network's name, as ``init_network`` wrote it into the CA certificate."""
        values = self.ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return str(values[0].value) if values else ""


def init_network(folder: Path, network_name: str, now: datetime | None = None) -> NetworkFiles:
    """Create a new network in ``folder``; ConfigError if one is there already.

    On failure half-way, the files written so far are removed again, so a
    retry does not meet a half-made network.
    """
    name = network_name.strip()
    if not name or len(name) > MAX_NETWORK_NAME_LENGTH or not name.isprintable():
        raise InvalidInput(
            f"the network name must be 1-{MAX_NETWORK_NAME_LENGTH} printable characters"
        )
    present = [f for f in FILES if (folder / f).exists()]
    if present:
        raise ConfigError(
            f"{folder} already holds a network ({', '.join(present)}); "
            "refusing to overwrite it: choose another folder"
        )
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    except OSError as error:
        raise ConfigError(f"cannot create the network folder {folder}: {error.strerror}") from None
    ca_key, ca_cert = pki.create_ca(name, now)
    registry_key = pki.new_private_key()
    registry_cert = pki.issue_registry_certificate(ca_key, ca_cert, registry_key, now=now)
    network_key = new_network_key()
    written: list[Path] = []
    try:
        for filename, write in (
            (CA_KEY, lambda p: pki.write_private_key(p, ca_key)),
            (CA_CERT, lambda p: pki.write_certificate(p, ca_cert)),
            (REGISTRY_KEY, lambda p: pki.write_private_key(p, registry_key)),
            (REGISTRY_CERT, lambda p: pki.write_certificate(p, registry_cert)),
            (NETWORK_KEY, lambda p: write_network_key(p, network_key)),
        ):
            path = folder / filename
            written.append(path)
            write(path)
    except OSError as error:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise ConfigError(f"cannot write the network folder {folder}: {error.strerror}") from None
    return NetworkFiles(
        folder=folder,
        ca_key=ca_key,
        ca_cert=ca_cert,
        tls=transport.TlsFiles(pki.pem(ca_cert), pki.pem(registry_cert), pki.key_pem(registry_key)),
        network_key=network_key,
    )


def load_network(folder: Path) -> NetworkFiles:
    """Read and cross-check a network folder; ConfigError naming what is wrong."""
    if not folder.is_dir():
        raise ConfigError(
            f"there is no network folder {folder}: "
            f"create one with `transmural-admin network init --dir {folder}`"
        )
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise ConfigError(
            f"the network folder {folder} is incomplete: {', '.join(missing)} missing"
        )
    ca_key = pki.read_private_key(folder / CA_KEY)
    ca_cert = pki.read_certificate(folder / CA_CERT)
    if ca_key.public_key() != ca_cert.public_key():
        raise ConfigError(f"{folder / CA_KEY} is not the key of the CA {folder / CA_CERT}")
    tls = transport.TlsFiles.load(folder / CA_CERT, folder / REGISTRY_CERT, folder / REGISTRY_KEY)
    network_key = read_network_key(folder / NETWORK_KEY)
    return NetworkFiles(folder, ca_key, ca_cert, tls, network_key)
