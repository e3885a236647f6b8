"""The network's certificates: CA, registry and node certificates, CSRs.

Every key is ECDSA P-256. A node certificate says who the node is: common
name = node id, O = organisation name, organizationIdentifier (2.5.4.97) =
organisation id (e.g. URA), and the DNS name ``<node id>.node.transmural``
that peers check when they dial it. The registry's certificate carries the
DNS name ``registry.transmural`` and, in a private extension, the CA
certificate itself, so that a joining node holding only the CA fingerprint
from its invite can fetch, check and then trust the CA (see ``bootstrap``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from transmural.errors import ConfigError, InvalidInput

REGISTRY_DNS_NAME = "registry.transmural"
NODE_DNS_SUFFIX = ".node.transmural"
#: Private extension on the registry certificate holding the CA certificate (DER).
CA_BOOTSTRAP_OID = ObjectIdentifier("1.3.6.1.4.1.55555.1.1")

#: Kinds of facility a certificate may name (OU); consent can be given per kind.
ORGANISATION_CATEGORIES = ("hospital", "gp", "pharmacy", "nursing-home")

CA_DAYS = 3650
REGISTRY_DAYS = 825
NODE_DAYS = 365

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class CertificateIdentity:
    """Who a certificate names: what servers take the caller's identity from."""

    node_id: str
    organisation_id: str
    organisation_name: str
    serial: str  # hex
    not_after: datetime
    organisation_category: str = ""  # OU: hospital, gp, pharmacy, nursing-home


def node_dns_name(node_id: str) -> str:
    """The name a peer checks in a node's certificate when it dials that node."""
    return f"{node_id}{NODE_DNS_SUFFIX}"


def new_private_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(
    network_name: str, now: datetime | None = None
) -> tuple[PrivateKey, x509.Certificate]:
    """A self-signed network CA that may sign node and registry certificates only."""
    key = new_private_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{network_name} network CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, network_name),
        ]
    )
    start = _now(now)
    cert = (
        _builder(name, name, key.public_key(), start, CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def issue_registry_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    key: PrivateKey,
    extra_dns_names: list[str] | None = None,
    now: datetime | None = None,
) -> x509.Certificate:
    """The registry's server (and client) certificate, carrying the CA for bootstrap."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, REGISTRY_DNS_NAME)])
    names = [REGISTRY_DNS_NAME, "localhost", *(extra_dns_names or [])]
    builder = _leaf(ca_cert, subject, key.public_key(), _now(now), REGISTRY_DAYS, names)
    builder = builder.add_extension(
        x509.UnrecognizedExtension(
            CA_BOOTSTRAP_OID, ca_cert.public_bytes(serialization.Encoding.DER)
        ),
        critical=False,
    )
    return builder.sign(ca_key, hashes.SHA256())


def make_csr(key: PrivateKey, node_id: str) -> x509.CertificateSigningRequest:
    """A node's certificate request; only its public key is used by the registry."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def issue_node_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    node_id: str,
    organisation_id: str,
    organisation_name: str,
    now: datetime | None = None,
    days: int = NODE_DAYS,
    organisation_category: str = "",
) -> x509.Certificate:
    """Sign a node's CSR. Identity comes from the invite, never from the CSR.

    ``organisation_category`` (OU) is what consent rules by kind of facility
    ("no pharmacies") are checked against.
    """
    if not csr.is_signature_valid:
        raise InvalidInput("the certificate request's signature does not verify")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise InvalidInput("the certificate request must carry an ECDSA P-256 key")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, node_id),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation_name),
            x509.NameAttribute(NameOID.ORGANIZATION_IDENTIFIER, organisation_id),
            *(
                [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organisation_category)]
                if organisation_category
                else []
            ),
        ]
    )
    names = [node_dns_name(node_id), "localhost"]
    return _leaf(ca_cert, subject, public_key, _now(now), days, names).sign(ca_key, hashes.SHA256())


def identity(cert: x509.Certificate) -> CertificateIdentity:
    """Node id, organisation and serial named by a (verified) certificate."""

    def attribute(oid: ObjectIdentifier) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    return CertificateIdentity(
        node_id=attribute(NameOID.COMMON_NAME),
        organisation_id=attribute(NameOID.ORGANIZATION_IDENTIFIER),
        organisation_name=attribute(NameOID.ORGANIZATION_NAME),
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc,
        organisation_category=attribute(NameOID.ORGANIZATIONAL_UNIT_NAME),
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def bootstrap_ca(registry_cert: x509.Certificate, expected_fingerprint: str) -> x509.Certificate:
    """The CA a registry certificate carries, if it matches the pinned fingerprint.

    InvalidInput when the registry's certificate carries no CA, a CA with
    another fingerprint, or was not issued by that CA.
    """
    try:
        extension = registry_cert.extensions.get_extension_for_oid(CA_BOOTSTRAP_OID)
    except x509.ExtensionNotFound:
        raise InvalidInput("the registry's certificate does not carry its network CA") from None
    value = extension.value
    assert isinstance(value, x509.UnrecognizedExtension)
    ca = x509.load_der_x509_certificate(value.value)
    if fingerprint(ca) != expected_fingerprint.lower():
        raise InvalidInput(
            "the registry's network CA does not match the fingerprint in the invite "
            f"(got {fingerprint(ca)[:16]}…, expected {expected_fingerprint[:16]}…)"
        )
    try:
        registry_cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidInput("the registry's certificate was not issued by its network CA") from None
    return ca


# --- files ---


def write_private_key(path: Path, key: PrivateKey) -> None:
    """PEM (PKCS#8, unencrypted), mode 0600 from the first byte on."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(path, 0o600)


def read_private_key(path: Path) -> PrivateKey:
    """A key written by ``write_private_key``; ConfigError naming what is wrong."""
    data = _read(path, "private key")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"the private key {path} is readable by others: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an ECDSA private key")
    return key


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def staged(path: Path) -> Path:
    """Where a renewed key or certificate waits beside ``path`` until both are written."""
    return path.with_name(f".{path.name}.renewed")


def stage_renewal(key_path: Path, cert_path: Path, key: PrivateKey, cert: x509.Certificate) -> None:
    """Write a new key and certificate beside the old pair; ``complete_renewal`` swaps them.

    Two renames cannot be one step: a renewal cut off between them is
    finished by the next ``complete_renewal`` (the node runs it at start).
    Each staged file appears whole or not at all; the certificate last.
    """
    for final, write in (
        (staged(key_path), lambda p: write_private_key(p, key)),
        (staged(cert_path), lambda p: write_certificate(p, cert)),
    ):
        partial = final.with_name(final.name + ".part")  # whole under its staged name, or absent
        write(partial)
        os.replace(partial, final)


def complete_renewal(key_path: Path, cert_path: Path) -> bool:
    """Put a staged pair in place, key first; True if anything moved.

    A staged key without its certificate is a staging cut off: it is
    dropped and the old pair stays. ConfigError if the staged certificate
    fits neither the staged nor the current key.
    """
    new_key, new_cert = staged(key_path), staged(cert_path)
    for part in (new_key, new_cert):  # a staged file cut off while written
        part.with_name(part.name + ".part").unlink(missing_ok=True)
    if not new_cert.exists():
        new_key.unlink(missing_ok=True)
        return False
    fitting = read_private_key(new_key if new_key.exists() else key_path)
    if read_certificate(new_cert).public_key() != fitting.public_key():
        raise ConfigError(
            f"{new_cert} (a renewal cut off) does not fit the key it would go with: "
            f"remove it, and {new_key} if there"
        )
    if new_key.exists():
        os.replace(new_key, key_path)
    os.replace(new_cert, cert_path)
    return True


def read_certificate(path: Path) -> x509.Certificate:
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate") from None


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the {what} {path}: {error.strerror}") from None


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    start: datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - timedelta(minutes=5))
        .not_valid_after(start + timedelta(days=days))
    )


def _leaf(
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    start: datetime,
    days: int,
    dns_names: list[str],
) -> x509.CertificateBuilder:
    ca_key_id = x509.SubjectKeyIdentifier.from_public_key(ca_cert.public_key())
    return (
        _builder(subject, ca_cert.subject, public_key, start, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
            critical=False,
        )
    )
