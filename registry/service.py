"""The Registry gRPC service: proto in, domain call, proto out.

Deliberately thin: every rule lives in ``registry.index``, and every error
becomes a gRPC status in ``transmural.status.maps_errors``. Until nodes carry
certificates the publishing node is taken from the request on trust; the
trust work moves it to the caller's certificate without touching the domain.
"""

from __future__ import annotations

import grpc

from registry.index import IndexChange, MasterPatientIndex, NodeDirectory, NodeRecord
from transmural.status import maps_errors
from transmural.v1 import common_pb2, registry_pb2, registry_pb2_grpc

SERVICE_NAME: str = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name


def node_info(node: NodeRecord) -> common_pb2.NodeInfo:
    """The wire form of a directory entry."""
    return common_pb2.NodeInfo(
        node_id=node.node_id,
        organisation_name=node.organisation_name,
        organisation_id=node.organisation_id,
        endpoint=node.endpoint,
    )


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    """Serves ``transmural.v1.Registry`` over a node directory and an index."""

    def __init__(self, directory: NodeDirectory, index: MasterPatientIndex) -> None:
        self._directory = directory
        self._index = index

    @maps_errors
    async def RegisterNode(
        self, request: registry_pb2.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterNodeResponse:
        wire = request.node
        stored = await self._directory.register(
            NodeRecord(
                node_id=wire.node_id,
                organisation_name=wire.organisation_name,
                organisation_id=wire.organisation_id,
                endpoint=wire.endpoint,
            )
        )
        return registry_pb2.RegisterNodeResponse(node=node_info(stored))

    @maps_errors
    async def Publish(
        self, request: registry_pb2.PublishRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.PublishResponse:
        changes = [IndexChange(e.pseudonym, e.withdrawn) for e in request.entries]
        result = await self._index.publish(request.node_id, changes)
        return registry_pb2.PublishResponse(published=result.published, withdrawn=result.withdrawn)

    @maps_errors
    async def Locate(
        self, request: registry_pb2.LocateRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.LocateResponse:
        locations = await self._index.locate(list(request.pseudonyms))
        wire_nodes: dict[str, common_pb2.NodeInfo] = {}
        response = registry_pb2.LocateResponse()
        for location in locations:
            holders = []
            for node in location.holders:
                if node.node_id not in wire_nodes:
                    wire_nodes[node.node_id] = node_info(node)
                holders.append(wire_nodes[node.node_id])
            response.locations.add(pseudonym=location.pseudonym, holders=holders)
        return response

    @maps_errors
    async def ListNodes(
        self, request: registry_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListNodesResponse:
        nodes = await self._directory.list_nodes()
        return registry_pb2.ListNodesResponse(nodes=[node_info(n) for n in nodes])
