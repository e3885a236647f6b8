"""The facility node: builds its parts in order and runs them.

key files -> store -> registry link -> revocation list -> peer channels
-> holder and gateway -> peer server (mutual TLS) and gateway server (TLS +
clinician tokens) -> self-check -> index publisher and revocation poller.
``stop`` takes them down in the reverse order. Tests pass their own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from node import const
from node.answers import Facility
from node.assertions import AssertionCheck, AssertionSigner
from node.audit import AuditLog, AuditRecord
from node.audit_asking import AskingAudit
from node.config import NodeConfig
from node.consent import ConsentPolicy
from node.gateway import Gateway
from node.holder import RecordHolder
from node.listing import PatientListing
from node.peer_link import PeerChannels
from node.publisher import IndexPublisher
from node.registry_link import RegistryLink
from node.revocations import RevocationList
from node.service import GATEWAY_SERVICE, PEER_SERVICE, GatewayServicer, PeerServicer
from node.store import NodeStore
from node.users import Clinicians
from transmural import pki, transport
from transmural.assertion import AssertionVerifier
from transmural.auth import CertificateInterceptor
from transmural.clock import Clock, SystemClock
from transmural.errors import ConfigError
from transmural.pseudonym import Pseudonymiser, key_check, read_network_key
from transmural.server_lock import ServerLock
from transmural.v1 import gateway_pb2_grpc, peer_pb2_grpc

log = logging.getLogger(__name__)


class NodeServer:
    """One facility node: Peer service for peers, Gateway service for clinicians."""

    def __init__(self, config: NodeConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self._address = ""
        self._gateway_address = ""
        self._lock: ServerLock | None = None
        self._store: NodeStore | None = None
        self._registry: RegistryLink | None = None
        self._peers: PeerChannels | None = None
        self._servers: list[grpc.aio.Server] = []
        self._publisher: IndexPublisher | None = None
        self._revocations: RevocationList | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._own: pki.CertificateIdentity | None = None
        self._audit: AuditLog | None = None

    @property
    def address(self) -> str:
        """The peer port's real ``host:port`` (mutual TLS), after ``start``."""
        return self._address

    @property
    def gateway_address(self) -> str:
        """The gateway port's real ``host:port`` (TLS, clinician tokens)."""
        return self._gateway_address

    @property
    def store(self) -> NodeStore:
        assert self._store is not None, "node not started"
        return self._store

    @property
    def publisher(self) -> IndexPublisher:
        assert self._publisher is not None, "node not started"
        return self._publisher

    @property
    def audit(self) -> AuditLog:
        """The node's hash-chained audit log (in its own database)."""
        assert self._audit is not None, "node not started"
        return self._audit

    @property
    def consent_policy(self) -> ConsentPolicy:
        """The network's consent settings, as this node's config carries them."""
        return ConsentPolicy(
            default=self.config.consent_default,  # type: ignore[arg-type]
            break_the_glass=self.config.break_the_glass,
        )

    @property
    def revocations(self) -> RevocationList:
        assert self._revocations is not None, "node not started"
        return self._revocations

    async def start(self) -> None:
        """Build and start every part; on failure, undo what was started."""
        try:
            await self._start()
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self) -> None:
        config = self.config
        config.check_dialable()
        network_key = read_network_key(config.network_key_file)
        pseudonymiser = Pseudonymiser(network_key)
        self._lock = ServerLock.beside(config.database, "node")
        finished = await self._finish_cut_off_rejoin()
        tls, key = self._load_tls()
        self._store = await NodeStore.open(config.database, node=config.identity)
        self._audit = AuditLog(self._store.database, self.clock)
        if finished:
            await self._record_finished_rejoin(self._store, self._audit)
        self._registry = RegistryLink(config.registry, tls, key_check(network_key))
        signer = AssertionSigner(config.node_id, config.organisation_id, key, self.clock)
        self._peers = PeerChannels(tls, signer, self.clock)
        gateway = Gateway(
            pseudonymiser, self._registry, self._peers, self.clock, config.peer_deadline_s,
            AskingAudit(self.audit, self._store, config.node_id),
        )  # fmt: skip
        self._revocations = RevocationList(self._registry, self._store, gateway.forget_revoked)
        await self._revocations.load()
        verifier = None if tls is None else AssertionVerifier(config.node_id, self.clock)
        await self._serve_peers(tls, AssertionCheck(verifier, config.node_id))
        await self._serve_gateway(tls, gateway)
        if tls is not None:
            await self._check_client_certificates_required(tls)
        # The registry hands peers this address: the bound one, unless the
        # node listens on 0.0.0.0 behind a name or NAT and says how to dial it.
        endpoint = config.advertise or self._address
        facility = Facility(
            config.node_id, config.organisation_name, config.organisation_id, endpoint
        )
        listing = PatientListing(self._store, self.consent_policy, self.clock)
        self._publisher = IndexPublisher(self._store, self._registry, facility, self.clock, listing)
        await self._revocations.refresh()
        self._tasks = [
            asyncio.create_task(self._publisher.run(), name="index-publisher"),
            asyncio.create_task(self._revocations.run(), name="revocation-poller"),
            asyncio.create_task(self._watch_certificate(), name="certificate-watch"),
        ]
        log.info(
            "node %s serving peers on %s, clinicians on %s%s",
            config.node_id, self._address, self._gateway_address,
            " (INSECURE: plain gRPC, --insecure-dev)" if tls is None else "",
        )  # fmt: skip

    async def _finish_cut_off_rejoin(self) -> bool:
        """A rejoin stopped after staging leaves the new key and certificate beside the old."""
        key, certificate = self.config.private_key, self.config.certificate
        if key is None or certificate is None:
            return False
        finished = await asyncio.to_thread(pki.complete_renewal, key, certificate)
        if finished:
            log.warning("finished a rejoin that was cut off: its key and certificate are in place")
        return finished

    async def _record_finished_rejoin(self, store: NodeStore, audit: AuditLog) -> None:
        """What the cut-off rejoin may not have done: re-list every patient, say so in the log."""
        await store.request_full_relisting()
        assert self._own is not None
        await audit.append(
            AuditRecord(
                action="join", outcome="granted", side="local",
                outcome_reason=f"finished a re-join cut off: certificate {self._own.serial} in "
                "place, every patient queued to be listed again",
                organisation_id=self.config.organisation_id, requesting_node=self.config.node_id,
            )
        )  # fmt: skip

    def _load_tls(self) -> tuple[transport.TlsFiles | None, ec.EllipticCurvePrivateKey | None]:
        config = self.config
        if config.insecure_dev:
            return None, None
        assert config.certificate and config.private_key and config.ca_certificate
        tls = transport.TlsFiles.load(config.ca_certificate, config.certificate, config.private_key)
        own = pki.identity(pki.read_certificate(config.certificate))
        if own.node_id != config.node_id:
            raise ConfigError(
                f"the certificate {config.certificate} is node {own.node_id}'s, "
                f"not {config.node_id}'s"
            )
        self._warn_if_expiring(own)
        self._own = own
        return tls, pki.read_private_key(config.private_key)

    def _warn_if_expiring(self, own: pki.CertificateIdentity) -> None:
        left = own.not_after - datetime.fromtimestamp(self.clock.now(), UTC)
        if left <= timedelta(0):
            raise ConfigError(f"this node's certificate expired on {own.not_after:%Y-%m-%d}")
        if left < timedelta(days=const.CERTIFICATE_WARNING_DAYS):
            log.warning(
                "this node's certificate expires on %s (in %d days): renew it",
                f"{own.not_after:%Y-%m-%d}", left.days,
            )  # fmt: skip

    async def _watch_certificate(self) -> None:
        """Repeat the expiry warning while the node runs (nodes run for months)."""
        while self._own is not None:
            await asyncio.sleep(const.CERTIFICATE_CHECK_INTERVAL_S)
            try:
                self._warn_if_expiring(self._own)
            except ConfigError as expired:
                log.error("%s: peers now refuse this node", expired)

    async def _serve_peers(self, tls: transport.TlsFiles | None, check: AssertionCheck) -> None:
        assert self._store is not None and self._revocations is not None
        interceptors = [] if tls is None else [CertificateInterceptor(self._revocations.is_revoked)]
        server = transport.new_server(interceptors)
        peer_pb2_grpc.add_PeerServicer_to_server(
            PeerServicer(
                RecordHolder(self._store, self.audit, self.consent_policy, self.clock), check
            ),
            server,
        )
        health = transport.add_health_and_reflection(server, [PEER_SERVICE])
        self._servers.append(server)
        self._address = transport.bind(server, self.config.listen, tls)
        await server.start()
        await transport.mark_serving(health, [PEER_SERVICE])

    async def _serve_gateway(self, tls: transport.TlsFiles | None, gateway: Gateway) -> None:
        assert self._store is not None
        config = self.config
        server = transport.new_server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(
            GatewayServicer(
                gateway, Clinicians(self._store, self.clock, self.audit),
                config.national_system, config.organisation_id,
            ),
            server,
        )  # fmt: skip
        health = transport.add_health_and_reflection(server, [GATEWAY_SERVICE])
        self._servers.append(server)
        self._gateway_address = transport.bind(
            server, config.gateway_listen, tls, client_certificates=False
        )
        await server.start()
        await transport.mark_serving(health, [GATEWAY_SERVICE])

    async def _check_client_certificates_required(self, tls: transport.TlsFiles) -> None:
        """Refuse to run if the peer port would answer a client without a certificate."""
        anonymous = transport.TlsFiles(tls.ca_pem)
        channel = transport.open_channel(
            self._address, anonymous, pki.node_dns_name(self.config.node_id)
        )
        try:
            await transport.health_check(channel, timeout_s=2.0)
        except grpc.aio.AioRpcError:
            return  # refused, as it must be
        finally:
            await channel.close()
        raise ConfigError(f"the peer port {self._address} does not require client certificates")

    async def stop(self, grace: float = const.STOP_GRACE_S) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for server in self._servers:
            await server.stop(grace)
        if self._peers is not None:
            await self._peers.close()
        if self._registry is not None:
            await self._registry.close()
        if self._store is not None:
            await self._store.close()
        if self._lock is not None:
            self._lock.release()
        self._tasks, self._servers = [], []
        self._peers = self._registry = self._store = self._lock = None
        log.info("node %s stopped", self.config.node_id)
