"""Join a network with an invite token: the facility side of DESIGN flow 2.

``join`` never trusts anything it has not checked against the token:

1. decode the token (a damaged or expired one stops here, offline);
2. find the registry's join port: the token's address, else zeroconf on
   the LAN (only a registry advertising the token's CA fingerprint);
3. fetch the registry's certificate over a bare TLS handshake, take the
   network CA it carries and check that CA against the token's fingerprint
   (``pki.bootstrap_ca``): a registry of another network is refused
   *before* anything is sent to it;
4. make the node's private key here (it never leaves this machine), send
   a CSR and the invite secret over TLS pinned to that CA;
5. check the answer (same CA, a certificate for our key, issued by it),
   unwrap the network key with our private key;
6. write node.key, node.crt, ca.crt and network.key into the node folder.

Nothing is written unless every step succeeded, and an already joined
node folder is never overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from transmural import discovery, invite, keywrap, pki, transport
from transmural.clock import Clock, SystemClock, utc_iso
from transmural.errors import (
    ConfigError,
    InvalidInput,
    PermissionDenied,
    TransmuralError,
    Unavailable,
)
from transmural.pseudonym import MIN_KEY_LENGTH, write_network_key
from transmural.v1 import enrolment_pb2, enrolment_pb2_grpc

NODE_KEY = "node.key"
NODE_CERT = "node.crt"
CA_CERT = "ca.crt"
NETWORK_KEY = "network.key"
FILES = (NODE_KEY, NODE_CERT, CA_CERT, NETWORK_KEY)

#: Seconds for the bare TLS handshake that fetches the registry's certificate.
HANDSHAKE_TIMEOUT_S = 10.0
#: Seconds the Join call may take.
JOIN_TIMEOUT_S = 30.0
#: Seconds zeroconf browses for the registry when the token carries no address.
DISCOVERY_TIMEOUT_S = 5.0
#: What the CSR's subject says; the registry ignores it and names the node from the invite.
CSR_PLACEHOLDER_NAME = "joining-node"


@dataclass(frozen=True, slots=True)
class NodeFiles:
    """Where a joined node's key, certificate, CA and network key are."""

    node_key: Path
    node_cert: Path
    ca_cert: Path
    network_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> NodeFiles:
        return cls(folder / NODE_KEY, folder / NODE_CERT, folder / CA_CERT, folder / NETWORK_KEY)


@dataclass(frozen=True, slots=True)
class JoinedNode:
    node_id: str
    organisation_id: str
    organisation_name: str
    registry_endpoint: str  # host:port of the registry's mutual-TLS port
    paths: NodeFiles


@dataclass(frozen=True, slots=True)
class Enrolment:
    """What one successful Join gave: checked against the token and our own key."""

    key: pki.PrivateKey
    certificate: x509.Certificate
    ca: x509.Certificate
    network_key: bytes
    node: JoinedIdentity
    join_address: str


@dataclass(frozen=True, slots=True)
class JoinedIdentity:
    node_id: str
    organisation_id: str
    organisation_name: str
    registry_endpoint: str  # host:port of the registry's mutual-TLS port


async def join(
    token_text: str,
    node_dir: Path,
    interfaces_for_discovery: list[str] | None = None,
    clock: Clock | None = None,
) -> JoinedNode:
    """Join the network the token invites to; TransmuralError with a clear message if not.

    ``interfaces_for_discovery`` (default loopback only) are where zeroconf
    looks when the token carries no registry address.
    """
    token = decode_unexpired(token_text, clock)
    paths = NodeFiles.in_folder(node_dir)
    present = [p.name for p in _all(paths) if p.exists()]
    if present:
        raise ConfigError(
            f"{node_dir} already holds a joined node ({', '.join(present)}); "
            "refusing to overwrite it: choose another folder"
        )
    # Before the one-time Join: a folder it cannot write would waste the invite.
    done = await enrol(token, node_dir, interfaces_for_discovery)
    await asyncio.to_thread(
        _write_node_files, paths, done.key, done.certificate, done.ca, done.network_key
    )
    node = done.node
    return JoinedNode(
        node.node_id, node.organisation_id, node.organisation_name, node.registry_endpoint, paths
    )


def decode_unexpired(token_text: str, clock: Clock | None = None) -> invite.InviteToken:
    """The token, or InvalidInput if it is damaged or expired (checked offline, nothing sent)."""
    token = invite.decode(token_text)
    if invite.expired(token, (clock or SystemClock()).now()):
        raise InvalidInput(
            f"this invite expired at {_utc(token.expires_at)}; ask the operator for a new one"
        )
    return token


async def enrol(
    token: invite.InviteToken, writes_to: Path, interfaces_for_discovery: list[str] | None = None
) -> Enrolment:
    """Steps 2-5: find and check the registry, make a key, use the invite, check the answer.

    ``writes_to`` is checked writable before the invite is used up.
    """
    address = token.registry or await _discover(
        token.ca_fingerprint, interfaces_for_discovery or ["127.0.0.1"]
    )
    ca = pki.bootstrap_ca(await fetch_certificate(address), token.ca_fingerprint)
    key = pki.new_private_key()
    await asyncio.to_thread(_check_writable, writes_to)
    response = await _call_join(address, ca, token.secret, key)
    certificate, network_key = _check_answer(response, ca, key)
    node = JoinedIdentity(
        response.node.node_id,
        response.node.organisation_id,
        response.node.organisation_name,
        _reachable(response.registry_endpoint, address),
    )
    return Enrolment(key, certificate, ca, network_key, node, address)


async def fetch_certificate(address: str) -> x509.Certificate:
    """The registry's leaf certificate, from a TLS handshake that trusts nothing yet.

    It is checked by ``pki.bootstrap_ca`` before anything is sent.
    """
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            _, writer = await asyncio.open_connection(
                host.strip("[]"), int(port), ssl=context, server_hostname=pki.REGISTRY_DNS_NAME
            )
    except TimeoutError:
        raise Unavailable(
            f"cannot reach the registry's join port at {address}: no TLS handshake within "
            f"{HANDSHAKE_TIMEOUT_S:g} s (is it the join port?)"
        ) from None
    except (OSError, ssl.SSLError) as error:
        raise Unavailable(
            f"cannot reach the registry's join port at {address}: {error or type(error).__name__}"
        ) from None
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    if not der:
        raise InvalidInput(f"the server at {address} presented no certificate")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise InvalidInput(f"the server at {address} presented an unreadable certificate") from None


async def _discover(fingerprint: str, interfaces: list[str]) -> str:
    found = await discovery.find_registry(fingerprint, interfaces, DISCOVERY_TIMEOUT_S)
    if found is None:
        raise Unavailable(
            "the invite carries no registry address and no registry of this network "
            f"answered on the LAN ({', '.join(interfaces)}) within {DISCOVERY_TIMEOUT_S:.0f} s"
        )
    return found


async def _call_join(
    address: str, ca: x509.Certificate, secret: bytes, key: pki.PrivateKey
) -> enrolment_pb2.JoinResponse:
    csr = pki.make_csr(key, CSR_PLACEHOLDER_NAME)
    request = enrolment_pb2.JoinRequest(invite_secret=secret, csr_der=_der(csr))
    channel = transport.open_channel(
        address, transport.TlsFiles(pki.pem(ca)), pki.REGISTRY_DNS_NAME
    )
    try:
        stub = enrolment_pb2_grpc.EnrolmentStub(channel)
        response: enrolment_pb2.JoinResponse = await stub.Join(request, timeout=JOIN_TIMEOUT_S)
        return response
    except grpc.aio.AioRpcError as error:
        code, details = error.code(), error.details()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise Unavailable(
                f"the registry at {address} did not answer the join: {details}"
            ) from None
        if code == grpc.StatusCode.PERMISSION_DENIED:
            raise PermissionDenied(f"the registry refused the join: {details}") from None
        raise InvalidInput(f"the registry refused the join: {details}") from None
    finally:
        await channel.close()


def _check_answer(
    response: enrolment_pb2.JoinResponse, ca: x509.Certificate, key: pki.PrivateKey
) -> tuple[x509.Certificate, bytes]:
    """The certificate and network key, if the answer is what we asked for."""
    try:
        returned_ca = x509.load_der_x509_certificate(response.ca_certificate_der)
        certificate = x509.load_der_x509_certificate(response.certificate_der)
    except ValueError:
        raise InvalidInput("the registry's answer holds an unreadable certificate") from None
    if pki.fingerprint(returned_ca) != pki.fingerprint(ca):
        raise InvalidInput("the registry answered with another CA than the one it presented")
    if certificate.public_key() != key.public_key():
        raise InvalidInput("the certificate the registry issued is not for this node's key")
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidInput("the certificate the registry issued is not signed by its CA") from None
    issued = pki.identity(certificate)
    if issued.node_id != response.node.node_id or not issued.organisation_id:
        raise InvalidInput("the certificate the registry issued does not name this node")
    network_key = keywrap.unwrap_with(
        key, response.wrapped_network_key, keywrap.NETWORK_KEY_CONTEXT
    )
    if len(network_key) < MIN_KEY_LENGTH:
        raise InvalidInput("the network key the registry sent is too short")
    return certificate, network_key


def _write_node_files(
    paths: NodeFiles,
    key: pki.PrivateKey,
    certificate: x509.Certificate,
    ca: x509.Certificate,
    network_key: bytes,
) -> None:
    """Write all four files or none: each to a temporary name, then renamed into place."""
    folder = paths.node_key.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    except OSError as error:
        raise ConfigError(f"cannot create the node folder {folder}: {error.strerror}") from None
    staged: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for final, write in (
            (paths.node_key, lambda p: pki.write_private_key(p, key)),
            (paths.node_cert, lambda p: pki.write_certificate(p, certificate)),
            (paths.ca_cert, lambda p: pki.write_certificate(p, ca)),
            (paths.network_key, lambda p: write_network_key(p, network_key)),
        ):
            temporary = final.with_name(f".{final.name}.joining")
            staged.append((temporary, final))
            write(temporary)
        for _, final in staged:
            if final.exists():
                raise ConfigError(f"{final} appeared while joining; refusing to overwrite it")
        for temporary, final in staged:
            os.replace(temporary, final)
            placed.append(final)
    except (OSError, TransmuralError) as error:
        for path in [temporary for temporary, _ in staged] + placed:
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(error, TransmuralError):
            raise
        raise ConfigError(f"cannot write the node folder {folder}: {error.strerror}") from None


def _reachable(endpoint: str, join_address: str) -> str:
    """The registry's endpoint, with a wildcard host replaced by the one we joined at."""
    host, _, port = endpoint.rpartition(":")
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host.strip("[]")).is_unspecified:
            return f"{join_address.rpartition(':')[0]}:{port}"
    return endpoint


def _check_writable(folder: Path) -> None:
    """ConfigError unless ``folder`` can be made (or is there) and written; leaves it as found."""
    created = not folder.exists()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = folder / ".transmural-join-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"cannot write in the node folder {folder}: {error.strerror or error}; "
            "the invite is still unused"
        ) from None
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()


def _all(paths: NodeFiles) -> list[Path]:
    return [paths.node_key, paths.node_cert, paths.ca_cert, paths.network_key]


def _der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def _utc(epoch: float) -> str:
    return utc_iso(epoch).replace("T", " ").replace("+00:00", " UTC")
