"""The facility node: builds its parts in order and runs them.

store -> pseudonymiser -> registry link -> peer channels -> holder and
gateway -> gRPC server -> index publisher. ``stop`` takes them down in
the reverse order. Tests pass their own clock or store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from node import const
from node.answers import Facility
from node.config import NodeConfig
from node.gateway import Gateway
from node.holder import RecordHolder
from node.lock import NodeLock
from node.peer_link import PeerChannels
from node.publisher import IndexPublisher
from node.registry_link import RegistryLink
from node.service import GATEWAY_SERVICE, PEER_SERVICE, GatewayServicer, PeerServicer
from node.store import NodeStore
from transmural import transport
from transmural.clock import Clock, SystemClock
from transmural.pseudonym import Pseudonymiser, read_network_key
from transmural.v1 import gateway_pb2_grpc, peer_pb2_grpc

log = logging.getLogger(__name__)

SERVICES = [PEER_SERVICE, GATEWAY_SERVICE]


class NodeServer:
    """One facility node: Peer and Gateway services over its own store."""

    def __init__(self, config: NodeConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self._address = ""
        self._store: NodeStore | None = None
        self._registry: RegistryLink | None = None
        self._peers: PeerChannels | None = None
        self._server: grpc.aio.Server | None = None
        self._publisher: IndexPublisher | None = None
        self._publishing: asyncio.Task[None] | None = None
        self._lock: NodeLock | None = None

    @property
    def address(self) -> str:
        """The real ``host:port`` the node serves on (after ``start``)."""
        return self._address

    @property
    def store(self) -> NodeStore:
        assert self._store is not None, "node not started"
        return self._store

    @property
    def publisher(self) -> IndexPublisher:
        assert self._publisher is not None, "node not started"
        return self._publisher

    async def start(self) -> None:
        """Build and start every part; on failure, undo what was started."""
        try:
            await self._start()
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self) -> None:
        config = self.config
        pseudonymiser = Pseudonymiser(read_network_key(config.network_key_file))
        self._lock = NodeLock.acquire(config.database.with_name(config.database.name + ".lock"))
        self._store = await NodeStore.open(config.database)
        self._registry = RegistryLink(config.registry)
        self._peers = PeerChannels()
        gateway = Gateway(
            pseudonymiser, self._registry, self._peers, self.clock, config.peer_deadline_s
        )
        server = transport.new_server()
        peer_pb2_grpc.add_PeerServicer_to_server(PeerServicer(RecordHolder(self._store)), server)
        gateway_pb2_grpc.add_GatewayServicer_to_server(
            GatewayServicer(gateway, config.national_system), server
        )
        health = transport.add_health_and_reflection(server, SERVICES)
        self._server = server
        self._address = transport.bind(server, config.listen)
        await server.start()
        await transport.mark_serving(health, SERVICES)
        facility = Facility(
            config.node_id, config.organisation_name, config.organisation_id, self._address
        )
        self._publisher = IndexPublisher(self._store, self._registry, facility, self.clock)
        self._publishing = asyncio.create_task(self._publisher.run(), name="index-publisher")
        log.info("node %s serving on %s", config.node_id, self._address)

    async def stop(self, grace: float = const.STOP_GRACE_S) -> None:
        if self._publishing is not None:
            self._publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publishing
        if self._server is not None:
            await self._server.stop(grace)
        if self._peers is not None:
            await self._peers.close()
        if self._registry is not None:
            await self._registry.close()
        if self._store is not None:
            await self._store.close()
        if self._lock is not None:
            self._lock.release()
        self._publishing = self._server = self._peers = self._registry = None
        self._store = self._lock = None
        log.info("node %s stopped", self.config.node_id)
