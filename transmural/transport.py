"""Channel and server credentials, in one place.

Node<->node and node<->registry traffic is TLS 1.3 with certificates from
the network CA on both sides; the registry's join port and a node's
gateway port are TLS without client certificates (the invite secret and
the clinician's bearer token authenticate those calls). Plain gRPC is only
for ``--insecure-dev``. Servers also get the standard health and
reflection services, so grpcurl and grpc-health-probe work against them.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from transmural import pki
from transmural.const import (
    HANDSHAKE_TIMEOUT_MS,
    MAX_CONCURRENT_RPCS,
    MAX_CONNECTION_IDLE_MS,
    MAX_INCOMING_CONNECTIONS,
    MAX_MESSAGE_BYTES,
)
from transmural.errors import ConfigError
from transmural.status import MalformedRequestInterceptor

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 0),
    # grpc's own reconnect back-off grows to 120 s: after a long registry
    # outage a node would not notice it is back for two minutes. Peers have
    # their own back-off (node.peer_health) and fresh channels.
    ("grpc.max_reconnect_backoff_ms", 10_000),
]
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # A connection that never finishes its TLS handshake is dropped after
    # this long (grpc's default: 120 s), and a connection with no calls
    # after MAX_CONNECTION_IDLE_MS: each costs ~50 KB until it goes.
    ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM bytes of the network CA and of this process's certificate and key."""

    ca_pem: bytes
    cert_pem: bytes = b""
    key_pem: bytes = b""

    @classmethod
    def load(cls, ca: Path, cert: Path | None = None, key: Path | None = None) -> TlsFiles:
        """Read and check the files (ConfigError naming what is wrong)."""
        ca_cert = pki.read_certificate(ca)
        if cert is None or key is None:
            return cls(pki.pem(ca_cert))
        own = pki.read_certificate(cert)
        private = pki.read_private_key(key)
        if own.public_key() != private.public_key():
            raise ConfigError(f"the private key {key} does not belong to the certificate {cert}")
        try:
            own.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise ConfigError(f"the certificate {cert} was not issued by the CA in {ca}") from None
        return cls(pki.pem(ca_cert), pki.pem(own), pki.key_pem(private))


def open_channel(
    target: str, tls: TlsFiles | None, server_name: str | None = None
) -> grpc.aio.Channel:
    """A long-lived channel to a registry or node at ``host:port``.

    With ``tls`` the channel is TLS 1.3 and presents this process's
    certificate when it has one; ``server_name`` is the DNS name the peer's
    certificate must carry (a node's ``<id>.node.transmural``, the
    registry's ``registry.transmural``), whatever address it is dialled at.
    Without ``tls`` it is plain gRPC: ``--insecure-dev`` only.
    """
    if tls is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_pem,
        private_key=tls.key_pem or None,
        certificate_chain=tls.cert_pem or None,
    )
    options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, credentials, options=options)


def new_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_concurrent_rpcs: int | None = None,
    max_connections: int = MAX_INCOMING_CONNECTIONS,
    handshake_timeout_ms: int = HANDSHAKE_TIMEOUT_MS,
) -> grpc.aio.Server:
    """A server with our limits; an unparsable request is INVALID_ARGUMENT (``status``).

    At most ``max_concurrent_rpcs`` (default MAX_CONCURRENT_RPCS, read when
    called) calls run at once: a burst beyond that gets RESOURCE_EXHAUSTED at
    once instead of queueing with latency growing
    without limit. At most ``max_connections`` connections are open at once
    (a connection beyond is closed as it arrives), so idle sockets opened
    by a hostile client cannot grow the server's memory without limit.
    """
    options = [
        *(o for o in SERVER_OPTIONS if o[0] != "grpc.server_handshake_timeout_ms"),
        ("grpc.server_handshake_timeout_ms", handshake_timeout_ms),
        ("grpc.max_allowed_incoming_connections", max_connections),
    ]
    return grpc.aio.server(
        options=options,
        interceptors=[MalformedRequestInterceptor(), *interceptors],
        maximum_concurrent_rpcs=max_concurrent_rpcs or MAX_CONCURRENT_RPCS,
    )


def bind(
    server: grpc.aio.Server,
    address: str,
    tls: TlsFiles | None,
    client_certificates: bool = True,
) -> str:
    """Bind ``address`` (port 0 picks a free one); returns the real ``host:port``.

    With ``tls`` the port speaks TLS with this process's certificate and,
    when ``client_certificates``, refuses any client without a certificate
    from the network CA (grpc checks chain and validity in the handshake).
    Without ``tls`` the port is plain (``--insecure-dev``). ConfigError when
    the address is taken or not this machine's.
    """
    host, _, _ = address.rpartition(":")
    _check_free(address)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key_pem, tls.cert_pem)],
                root_certificates=tls.ca_pem if client_certificates else None,
                require_client_auth=client_certificates,
            )
            port = server.add_secure_port(address, credentials)
    except (OSError, RuntimeError):
        port = 0
    if port == 0:
        raise ConfigError(
            f"cannot listen on {address}: the address is in use or not this machine's"
        )
    return f"{host}:{port}"


def _check_free(address: str) -> None:
    """ConfigError saying why ``address`` cannot be bound, before grpc tries.

    grpc's own failure is an ERROR line from its C core on stderr and one
    status for every cause; and for a name with several addresses
    (localhost: 127.0.0.1 and ::1) grpc serves on those it could bind and
    quietly drops the rest. Each address the name resolves to is tried
    here; the sockets close at once, so grpc binds the port as usual. Host
    names resolve once, at start-up (the hosts file, or DNS).
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0:
        return
    try:
        found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ConfigError(f"cannot listen on {address}: {host} does not resolve") from None
    missing = []
    for family, kind, _, _, where in found:
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds
            try:
                probe.bind(where)
            except OSError as error:
                if error.errno != errno.EADDRNOTAVAIL:
                    raise ConfigError(f"cannot listen on {address}: {_why(error, where)}") from None
                missing.append(_why(error, where))  # e.g. ::1 where IPv6 is off: grpc skips it
    if len(missing) == len(found):
        raise ConfigError(f"cannot listen on {address}: {missing[0]}")


def _why(error: OSError, where: tuple[Any, ...]) -> str:
    said = {
        errno.EADDRINUSE: "in use (by another server, or by one of this server's own ports)",
        errno.EADDRNOTAVAIL: "not this machine's",
        errno.EACCES: "a port below 1024 needs privileges",
    }.get(error.errno or 0, error.strerror or str(error))
    return f"{where[0]} port {where[1]}: {said}"


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: list[str]
) -> health.HealthServicer:
    """Standard health (all SERVING once started) and reflection services."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return health_servicer


async def mark_serving(health_servicer: health.HealthServicer, service_names: list[str]) -> None:
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def health_check(channel: grpc.aio.Channel, timeout_s: float) -> None:
    """One standard health check on ``channel``; raises AioRpcError if refused."""
    stub = health_pb2_grpc.HealthStub(channel)
    await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
