"""The gRPC side of a node's calls to the registry.

One long-lived channel. Registry failures become ``Unavailable`` (the
gateway cannot say "no records" when it could not ask) or ``NotFound``
(the registry does not know this node yet).
"""

from __future__ import annotations

import grpc

from node import const
from node.answers import Facility
from node.convert import facility_from_proto, facility_to_proto
from node.records import IndexChange
from transmural import pki, transport
from transmural.errors import (
    ConfigError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    TimedOut,
    TransmuralError,
    Unavailable,
)
from transmural.v1 import registry_pb2, registry_pb2_grpc


class RegistryLink:
    """Register, publish and locate, against one registry."""

    def __init__(
        self, address: str, tls: transport.TlsFiles | None, network_key_check: bytes = b""
    ) -> None:
        self.address = address
        self._network_key_check = network_key_check
        self._channel = transport.open_channel(address, tls, pki.REGISTRY_DNS_NAME)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def register(self, facility: Facility) -> None:
        request = registry_pb2.RegisterNodeRequest(
            node=facility_to_proto(facility), network_key_check=self._network_key_check
        )
        await self._call(self._stub.RegisterNode, request)

    async def publish(self, node_id: str, changes: list[IndexChange]) -> None:
        request = registry_pb2.PublishRequest(
            node_id=node_id,
            entries=[
                registry_pb2.IndexEntry(pseudonym=c.pseudonym, withdrawn=c.withdrawn)
                for c in changes
            ],
        )
        await self._call(self._stub.Publish, request)

    async def locate(self, pseudonym: bytes) -> list[Facility]:
        request = registry_pb2.LocateRequest(pseudonyms=[pseudonym])
        response = await self._call(self._stub.Locate, request)
        if len(response.locations) != 1:
            raise Unavailable("the registry gave a malformed answer to locate")
        return [facility_from_proto(h) for h in response.locations[0].holders]

    async def list_nodes(self) -> list[Facility]:
        response = await self._call(self._stub.ListNodes, registry_pb2.ListNodesRequest())
        return [facility_from_proto(n) for n in response.nodes]

    async def revocations(self) -> dict[str, str]:
        """Every revoked certificate's serial, with the node id it was issued to."""
        response = await self._call(
            self._stub.ListRevocations, registry_pb2.ListRevocationsRequest()
        )
        return {r.serial: r.node_id for r in response.revocations}

    async def _call(self, method, request):  # type: ignore[no-untyped-def]
        try:
            return await method(request, timeout=const.REGISTRY_DEADLINE_S)
        except grpc.aio.AioRpcError as error:
            raise self._domain_error(error) from None

    def _domain_error(self, error: grpc.aio.AioRpcError) -> TransmuralError:
        code, detail = error.code(), error.details() or ""
        if code is grpc.StatusCode.NOT_FOUND:
            return NotFound(f"registry: {detail}")
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInput(f"registry: {detail}")
        if code is grpc.StatusCode.PERMISSION_DENIED:
            return PermissionDenied(f"registry: {detail}")
        if code is grpc.StatusCode.FAILED_PRECONDITION:
            return ConfigError(f"registry: {detail}")  # this node's setup, not the network
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return TimedOut(f"this node's registry at {self.address} did not answer in time")
        if code is grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"this node cannot reach its registry at {self.address}")
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and detail:
            return Unavailable(f"registry: {detail}")  # busy, in its words: asked again later
        return Unavailable(f"registry: {code.name}: {detail}")
