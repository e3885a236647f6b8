"""The registry deployable: one object that builds its parts in order and runs them.

With a network folder (the normal case) the registry runs two gRPC servers:

- the **mutual-TLS port** (``address``): Registry, health and reflection;
  every caller presents a node certificate from the network CA (grpc
  checks chain and validity in the handshake; ``CertificateInterceptor``
  refuses revoked ones and names the caller);
- the **join port** (``join_address``): Enrolment only, TLS without a
  client certificate, authenticated by the invite secret.

``start`` loads the network, opens the store, builds the domain objects,
binds and starts both servers, checks that the mutual-TLS port really
refuses a client without a certificate, starts reloading revocations every
``REVOCATION_REFRESH_S`` and, if asked, advertises the join port with
zeroconf; ``stop`` undoes that in reverse. Without a network folder
(``--insecure-dev``) it is one plain port and no enrolment. Tests bind to
port 0 and read the addresses back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from registry import const
from registry.enrolment import Membership
from registry.index import MasterPatientIndex, NodeDirectory
from registry.network import NetworkFiles, load_network
from registry.service import (
    SERVICE_NAME,
    EnrolmentServicer,
    RegistryServicer,
)
from registry.store import RegistryStore
from transmural import discovery, pki, transport
from transmural.auth import CertificateInterceptor
from transmural.clock import Clock, SystemClock
from transmural.errors import ConfigError
from transmural.pseudonym import key_check
from transmural.server_lock import ServerLock
from transmural.v1 import enrolment_pb2_grpc, registry_pb2_grpc

log = logging.getLogger(__name__)

_LISTEN = re.compile(r"(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")


def check_listen(listen: str) -> str:
    """``host:port`` to listen on (port 0 picks one); ConfigError saying why not."""
    match = _LISTEN.fullmatch(listen)
    if match is None or int(match["port"]) > 65535:
        raise ConfigError(
            f"cannot listen on {listen!r}: give host:port with a port from 0 to 65535, "
            "e.g. 127.0.0.1:7300"
        )
    return listen


def dialable(address: str) -> str:
    """``address`` with a wildcard host (0.0.0.0, [::]) replaced by loopback, to dial ourselves."""
    host, _, port = address.rpartition(":")
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host.strip("[]"))
        if ip.is_unspecified:
            return f"[::1]:{port}" if ip.version == 6 else f"127.0.0.1:{port}"
    return address


def build_grpc_server(
    servicer: RegistryServicer, interceptors: list[grpc.aio.ServerInterceptor] | None = None
) -> tuple[grpc.aio.Server, Any]:
    """A gRPC server carrying the registry, health and reflection; not yet bound."""
    server = transport.new_server(interceptors or [])
    registry_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
    health = transport.add_health_and_reflection(server, [SERVICE_NAME])
    return server, health


async def check_requires_client_certificates(address: str, tls: transport.TlsFiles) -> None:
    """ConfigError unless ``address`` answers with a certificate and refuses without one.

    The positive probe (with the registry's own certificate) guards against
    the negative one passing only because the port is broken.
    """
    target = dialable(address)
    anonymous = transport.TlsFiles(tls.ca_pem)
    for credentials, should_answer in ((tls, True), (anonymous, False)):
        channel = transport.open_channel(target, credentials, pki.REGISTRY_DNS_NAME)
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=const.SELF_CHECK_TIMEOUT_S
            )
            answered = True
        except grpc.aio.AioRpcError as error:
            answered = False
            reason = error.details()
        finally:
            await channel.close()
        if should_answer and not answered:
            raise ConfigError(
                f"the registry's mutual-TLS port {address} does not answer its own "
                f"certificate: {reason}"
            )
        if answered and not should_answer:
            raise ConfigError(
                f"the registry's mutual-TLS port {address} does not require client certificates"
            )


class RegistryServer:
    """The registry: store, directory, index, membership and gRPC servers, with a lifecycle."""

    def __init__(
        self,
        db_path: Path,
        listen: str = const.DEFAULT_LISTEN,
        join_listen: str = const.DEFAULT_JOIN_LISTEN,
        network_dir: Path | None = None,
        clock: Clock | None = None,
        advertise_interfaces: list[str] | None = None,
    ) -> None:
        """``network_dir`` None runs ``--insecure-dev``: one plain port, no enrolment."""
        self._db_path = Path(db_path)
        self._listen = check_listen(listen)
        self._join_listen = check_listen(join_listen)
        self._network_dir = network_dir
        self._clock = clock or SystemClock()
        self._advertise_interfaces = list(advertise_interfaces or [])
        if self._advertise_interfaces and network_dir is None:
            raise ConfigError("only a registry with a network can advertise its join port")
        self._lock: ServerLock | None = None
        self._store: RegistryStore | None = None
        self._servers: list[tuple[grpc.aio.Server, Any]] = []
        self._address: str | None = None
        self._join_address: str | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._advertisement: discovery.RegistryAdvertisement | None = None
        self.membership: Membership | None = None
        self.network: NetworkFiles | None = None

    @property
    def address(self) -> str:
        """The real ``host:port`` of the (mutual-TLS) registry port, after ``start``."""
        if self._address is None:
            raise RuntimeError("the registry server is not started")
        return self._address

    @property
    def join_address(self) -> str | None:
        """The real ``host:port`` of the join port; None under ``--insecure-dev``."""
        if self._address is None:
            raise RuntimeError("the registry server is not started")
        return self._join_address

    async def start(self) -> None:
        """Build the parts and start serving; ConfigError (and nothing left running) if not."""
        if self._store is not None:
            raise RuntimeError("the registry server is already started")
        if self._network_dir is not None:
            self.network = await asyncio.to_thread(load_network, self._network_dir)
        self._lock = ServerLock.beside(self._db_path, "registry")
        try:
            self._store = await RegistryStore.open(self._db_path, self._clock)
            await self._start_servers(self._store)
        except BaseException:
            await self.stop(0)
            raise
        log.info(
            "registry serving on %s%s (database %s)",
            self._address,
            f", join port {self._join_address}" if self._join_address else " (insecure-dev)",
            self._db_path,
        )

    async def _start_servers(self, store: RegistryStore) -> None:
        directory = NodeDirectory(store, self._clock)
        index = MasterPatientIndex(store, directory, self._clock)
        network = self.network
        if network is None:
            server, health = build_grpc_server(RegistryServicer(directory, index))
            self._servers.append((server, health))
            self._address = transport.bind(server, self._listen, None)
            await server.start()
            await transport.mark_serving(health, [SERVICE_NAME])
            return
        await store.bind_network(network.ca_fingerprint, network.name, self._clock.now())
        membership = Membership(
            store,
            ca_cert=network.ca_cert,
            ca_key=network.ca_key,
            network_key=network.network_key,
            clock=self._clock,
        )
        await membership.refresh_revocations()
        self.membership = membership
        servicer = RegistryServicer(
            directory, index, membership, authenticated=True,
            network_key_check=key_check(network.network_key),
        )  # fmt: skip
        server, health = build_grpc_server(
            servicer, [CertificateInterceptor(membership.is_revoked)]
        )
        self._servers.append((server, health))
        self._address = transport.bind(server, self._listen, network.tls, client_certificates=True)

        join_server = transport.new_server()
        enrolment_pb2_grpc.add_EnrolmentServicer_to_server(
            EnrolmentServicer(membership, lambda: self.address), join_server
        )
        self._servers.append((join_server, None))
        self._join_address = transport.bind(
            join_server, self._join_listen, network.tls, client_certificates=False
        )
        await server.start()
        await join_server.start()
        await transport.mark_serving(health, [SERVICE_NAME])
        await check_requires_client_certificates(self._address, network.tls)
        self._warn_if_expiring(network)
        self._refresher = asyncio.create_task(self._refresh_revocations(membership))
        if self._advertise_interfaces:
            await self._advertise(network)

    def _warn_if_expiring(self, network: NetworkFiles) -> None:
        """Say so well before the registry's or the CA's certificate runs out."""
        now = self._clock.now()
        registry_cert = x509.load_pem_x509_certificate(network.tls.cert_pem)
        for what, cert in (("registry", registry_cert), ("network CA", network.ca_cert)):
            left = cert.not_valid_after_utc.timestamp() - now
            if left < const.CERTIFICATE_WARNING_S:
                log.warning(
                    "the %s certificate expires in %.0f days (%s)",
                    what,
                    max(left, 0) / 86400,
                    cert.not_valid_after_utc.isoformat(timespec="seconds"),
                )

    async def _advertise(self, network: NetworkFiles) -> None:
        assert self._join_address is not None
        host, _, port = self._join_address.rpartition(":")
        host = host.strip("[]")
        if ipaddress.ip_address(host).is_unspecified:
            host = self._advertise_interfaces[0]
        self._advertisement = discovery.RegistryAdvertisement(
            host,
            int(port),
            network.ca_fingerprint,
            self._advertise_interfaces,
            network_name=network.name,
        )
        await self._advertisement.start()

    async def _refresh_revocations(self, membership: Membership) -> None:
        """Reload revocations written by ``transmural-admin revoke`` in another process."""
        failing = False
        while True:
            await asyncio.sleep(const.REVOCATION_REFRESH_S)
            try:
                await membership.refresh_revocations()
            except Exception as error:
                # Keep serving with the revocations we have; warn once, then quietly.
                level = logging.DEBUG if failing else logging.WARNING
                log.log(level, "could not reload revocations (%s); keeping the last list", error)
                failing = True
            else:
                if failing:
                    log.warning("reloading revocations works again")
                failing = False

    async def stop(self, grace: float = const.SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop taking calls, give running ones ``grace`` seconds, then close the store."""
        if self._advertisement is not None:
            await self._advertisement.stop()
            self._advertisement = None
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        for _, health in self._servers:
            if health is not None:
                await health.enter_graceful_shutdown()
        await asyncio.gather(*(server.stop(grace) for server, _ in self._servers))
        if self._servers and self._address is not None:  # never served: nothing to say
            log.info("registry on %s stopped", self._address)
        self._servers = []
        if self._store is not None:
            await self._store.close()
            self._store = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._address = self._join_address = None
        self.membership = None
