"""The registry deployable: one object that builds its parts in order and runs them.

``RegistryServer.start`` opens the store, builds the domain objects on it,
builds the gRPC server (``build_grpc_server``, apart from running it so tests
and other deployments can add to it), binds and starts it; ``stop`` undoes
that in reverse. Tests bind to port 0 and read ``address`` back.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import grpc

from registry import const
from registry.index import MasterPatientIndex, NodeDirectory
from registry.service import SERVICE_NAME, RegistryServicer
from registry.store import RegistryStore
from transmural import transport
from transmural.clock import Clock, SystemClock
from transmural.errors import ConfigError
from transmural.v1 import registry_pb2_grpc

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


def build_grpc_server(servicer: RegistryServicer) -> tuple[grpc.aio.Server, Any]:
    """A gRPC server carrying the registry, health and reflection; not yet bound."""
    server = transport.new_server()
    registry_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
    health = transport.add_health_and_reflection(server, [SERVICE_NAME])
    return server, health


class RegistryServer:
    """The registry: store, node directory, index and gRPC server, with a lifecycle."""

    def __init__(
        self, db_path: Path, listen: str = const.DEFAULT_LISTEN, clock: Clock | None = None
    ) -> None:
        self._db_path = Path(db_path)
        self._listen = check_listen(listen)
        self._clock = clock or SystemClock()
        self._store: RegistryStore | None = None
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._address: str | None = None

    @property
    def address(self) -> str:
        """The real ``host:port`` the server listens on (after ``start``)."""
        if self._address is None:
            raise RuntimeError("the registry server is not started")
        return self._address

    async def start(self) -> None:
        """Open the store, build the parts and start serving; ConfigError if it cannot."""
        if self._server is not None:
            raise RuntimeError("the registry server is already started")
        self._store = await RegistryStore.open(self._db_path, self._clock)
        server: grpc.aio.Server | None = None
        try:
            directory = NodeDirectory(self._store, self._clock)
            index = MasterPatientIndex(self._store, directory, self._clock)
            server, health = build_grpc_server(RegistryServicer(directory, index))
            address = transport.bind(server, self._listen)
            await server.start()
            await transport.mark_serving(health, [SERVICE_NAME])
        except BaseException:
            if server is not None:
                await server.stop(None)
            await self._store.close()
            self._store = None
            raise
        self._server, self._health, self._address = server, health, address
        log.info("registry serving on %s (database %s)", address, self._db_path)

    async def stop(self, grace: float = const.SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop taking calls, give running ones ``grace`` seconds, then close the store."""
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
            log.info("registry on %s stopped", self._address)
        if self._store is not None:
            await self._store.close()
            self._store = None
        self._address = None
