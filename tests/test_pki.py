"""The network PKI: what each certificate says, and how a joining node learns to trust the CA."""

from __future__ import annotations

import hashlib
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from transmural import pki
from transmural.errors import ConfigError, InvalidInput

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return pki.create_ca("Test Net", now=NOW)


@pytest.fixture(scope="module")
def registry_cert(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> x509.Certificate:
    ca_key, ca_cert = ca
    return pki.issue_registry_certificate(
        ca_key, ca_cert, pki.new_private_key(), ["registry.example"], now=NOW
    )


def node_certificate(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], csr_name: str = "node-1"
) -> x509.Certificate:
    ca_key, ca_cert = ca
    csr = pki.make_csr(pki.new_private_key(), csr_name)
    return pki.issue_node_certificate(
        ca_key, ca_cert, csr, "node-1", "URA-12345678", "Hospital One", now=NOW
    )


def san(cert: x509.Certificate) -> list[str]:
    extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return extension.value.get_values_for_type(x509.DNSName)


# --- certificates ---


def test_ca_is_a_self_signed_p256_ca(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    _, cert = ca
    cert.verify_directly_issued_by(cert)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Test Net network CA"
    )
    assert cert.not_valid_after_utc - NOW == timedelta(days=pki.CA_DAYS)


def test_registry_certificate(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], registry_cert: x509.Certificate
) -> None:
    _, ca_cert = ca
    registry_cert.verify_directly_issued_by(ca_cert)
    assert san(registry_cert) == [pki.REGISTRY_DNS_NAME, "localhost", "registry.example"]
    constraints = registry_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert not constraints.value.ca
    usage = registry_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert registry_cert.not_valid_before_utc < NOW


def test_node_certificate_identity(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    _, ca_cert = ca
    cert = node_certificate(ca)
    cert.verify_directly_issued_by(ca_cert)
    assert san(cert) == ["node-1.node.transmural", "localhost"]
    assert pki.node_dns_name("node-1") == "node-1.node.transmural"
    who = pki.identity(cert)
    assert (who.node_id, who.organisation_id, who.organisation_name) == (
        "node-1",
        "URA-12345678",
        "Hospital One",
    )
    assert who.serial == format(cert.serial_number, "x")
    assert who.not_after == NOW + timedelta(days=pki.NODE_DAYS)


def test_node_identity_comes_from_the_invite_not_the_csr(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    assert pki.identity(node_certificate(ca, csr_name="node-evil")).node_id == "node-1"


def test_identity_of_a_certificate_without_organisation(
    registry_cert: x509.Certificate,
) -> None:
    who = pki.identity(registry_cert)
    assert (who.node_id, who.organisation_id, who.organisation_name) == (
        pki.REGISTRY_DNS_NAME,
        "",
        "",
    )


def test_fingerprint_is_sha256_of_der(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    _, cert = ca
    expected = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert pki.fingerprint(cert) == expected
    assert len(expected) == 64 and expected == expected.lower()


def test_csr_with_another_curve_refused(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    ca_key, ca_cert = ca
    csr = pki.make_csr(ec.generate_private_key(ec.SECP384R1()), "node-1")
    with pytest.raises(InvalidInput, match="ECDSA P-256"):
        pki.issue_node_certificate(ca_key, ca_cert, csr, "node-1", "URA-1", "One")


def test_csr_with_a_non_ec_key_refused(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    ca_key, ca_cert = ca
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-1")])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(ed25519.Ed25519PrivateKey.generate(), None)
    )
    with pytest.raises(InvalidInput, match="ECDSA P-256"):
        pki.issue_node_certificate(ca_key, ca_cert, csr, "node-1", "URA-1", "One")


# --- bootstrap: trusting the CA from a pinned fingerprint ---


def test_bootstrap_accepts_the_pinned_ca(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], registry_cert: x509.Certificate
) -> None:
    _, ca_cert = ca
    assert pki.bootstrap_ca(registry_cert, pki.fingerprint(ca_cert)) == ca_cert
    assert pki.bootstrap_ca(registry_cert, pki.fingerprint(ca_cert).upper()) == ca_cert


def test_bootstrap_refuses_a_wrong_fingerprint(registry_cert: x509.Certificate) -> None:
    with pytest.raises(InvalidInput, match="does not match the fingerprint in the invite"):
        pki.bootstrap_ca(registry_cert, "00" * 32)


def test_bootstrap_refuses_a_foreign_ca(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    """A registry of another network carries its own CA: not the one the invite pins."""
    foreign_key, foreign_ca = pki.create_ca("Other Net", now=NOW)
    foreign_registry = pki.issue_registry_certificate(
        foreign_key, foreign_ca, pki.new_private_key(), now=NOW
    )
    _, ca_cert = ca
    with pytest.raises(InvalidInput, match="does not match the fingerprint"):
        pki.bootstrap_ca(foreign_registry, pki.fingerprint(ca_cert))


def test_bootstrap_refuses_an_impostor_carrying_the_real_ca(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    """The CA certificate is public: an impostor can embed it but cannot get it to sign."""
    _, ca_cert = ca
    impostor_key, impostor_ca = pki.create_ca("Test Net", now=NOW)
    forged = pki.issue_registry_certificate(
        impostor_key, impostor_ca, pki.new_private_key(), now=NOW
    )
    # Re-issue the same certificate but carrying the real CA in the bootstrap extension.
    builder = (
        x509.CertificateBuilder()
        .subject_name(forged.subject)
        .issuer_name(ca_cert.subject)
        .public_key(forged.public_key())
        .serial_number(forged.serial_number)
        .not_valid_before(forged.not_valid_before_utc)
        .not_valid_after(forged.not_valid_after_utc)
        .add_extension(
            x509.UnrecognizedExtension(
                pki.CA_BOOTSTRAP_OID, ca_cert.public_bytes(serialization.Encoding.DER)
            ),
            critical=False,
        )
    )
    impostor = builder.sign(impostor_key, hashes.SHA256())
    with pytest.raises(InvalidInput, match="not issued by its network CA"):
        pki.bootstrap_ca(impostor, pki.fingerprint(ca_cert))


def test_bootstrap_refuses_a_certificate_without_the_extension(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    _, ca_cert = ca
    with pytest.raises(InvalidInput, match="does not carry its network CA"):
        pki.bootstrap_ca(node_certificate(ca), pki.fingerprint(ca_cert))


# --- files ---


def test_private_key_written_owner_only_and_read_back(tmp_path: Path) -> None:
    key = pki.new_private_key()
    path = tmp_path / "keys" / "node.key"
    pki.write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pki.read_private_key(path).private_numbers() == key.private_numbers()


def test_private_key_overwrite_stays_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    pki.write_private_key(path, pki.new_private_key())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_read_private_key_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    pki.write_private_key(path, pki.new_private_key())
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others: chmod 600"):
        pki.read_private_key(path)


def test_read_private_key_refuses_junk_and_missing(tmp_path: Path) -> None:
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        pki.read_private_key(junk)
    with pytest.raises(ConfigError, match="cannot read the private key"):
        pki.read_private_key(tmp_path / "missing.key")


def test_read_private_key_refuses_a_non_ecdsa_key(tmp_path: Path) -> None:
    path = tmp_path / "ed.key"
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not an ECDSA private key"):
        pki.read_private_key(path)


def test_certificate_round_trip_and_junk(
    tmp_path: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    _, ca_cert = ca
    path = tmp_path / "ca.pem"
    pki.write_certificate(path, ca_cert)
    assert pki.read_certificate(path) == ca_cert
    assert path.read_bytes() == pki.pem(ca_cert)
    path.write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        pki.read_certificate(path)


def node_pair(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> tuple[pki.PrivateKey, x509.Certificate]:
    ca_key, ca_cert = ca
    key = pki.new_private_key()
    csr = pki.make_csr(key, "node-1")
    cert = pki.issue_node_certificate(ca_key, ca_cert, csr, "node-1", "URA-1", "One", now=NOW)
    return key, cert


def test_a_renewal_swaps_the_pair_and_finishes_one_cut_off(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], tmp_path: Path
) -> None:
    key_path, cert_path = tmp_path / "node.key", tmp_path / "node.crt"
    old_key, old_cert = node_pair(ca)
    pki.write_private_key(key_path, old_key)
    pki.write_certificate(cert_path, old_cert)
    assert not pki.complete_renewal(key_path, cert_path)  # nothing staged: nothing moves

    new_key, new_cert = node_pair(ca)
    pki.stage_renewal(key_path, cert_path, new_key, new_cert)
    assert pki.complete_renewal(key_path, cert_path)
    assert pki.read_certificate(cert_path) == new_cert
    assert pki.read_private_key(key_path).public_key() == new_key.public_key()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not pki.staged(key_path).exists() and not pki.staged(cert_path).exists()

    # Cut off between the renames: the key is new, the certificate waits beside it.
    newer_key, newer_cert = node_pair(ca)
    pki.stage_renewal(key_path, cert_path, newer_key, newer_cert)
    pki.staged(key_path).replace(key_path)
    assert pki.complete_renewal(key_path, cert_path)
    assert pki.read_certificate(cert_path) == newer_cert

    # Cut off while staging: a key alone is dropped, the pair in place stays.
    pki.write_private_key(pki.staged(key_path), pki.new_private_key())
    assert not pki.complete_renewal(key_path, cert_path)
    assert not pki.staged(key_path).exists()
    assert pki.read_certificate(cert_path) == newer_cert

    # A staged certificate for no key here is refused, not installed.
    pki.write_certificate(pki.staged(cert_path), node_pair(ca)[1])
    with pytest.raises(ConfigError, match="does not fit the key"):
        pki.complete_renewal(key_path, cert_path)
    assert pki.read_certificate(cert_path) == newer_cert
