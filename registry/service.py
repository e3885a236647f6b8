"""The Registry and Enrolment gRPC services: proto in, domain call, proto out.

Deliberately thin: every rule lives in ``registry.index`` and
``registry.enrolment``, and every error becomes a gRPC status in
``transmural.status.maps_errors``.

Who calls is known from the client certificate (``transmural.auth``), never
from a request field: on a registry with a network, a node id in a request
must be the certificate's (or empty), and the directory's organisation
comes from the certificate. Only a registry run with ``--insecure-dev``
(``authenticated=False``) takes them from the request on trust.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from contextlib import AbstractContextManager

import grpc

from registry import const
from registry.enrolment import Membership
from registry.index import (
    IndexChange,
    MasterPatientIndex,
    NodeDirectory,
    NodeRecord,
    acting_node,
)
from transmural.auth import Caller, current_caller
from transmural.clock import utc_iso
from transmural.errors import ConfigError, PermissionDenied
from transmural.share import Share
from transmural.status import maps_errors
from transmural.v1 import (
    common_pb2,
    enrolment_pb2,
    enrolment_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

SERVICE_NAME: str = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name
ENROLMENT_SERVICE_NAME: str = enrolment_pb2.DESCRIPTOR.services_by_name["Enrolment"].full_name


def node_info(node: NodeRecord) -> common_pb2.NodeInfo:
    """The wire form of a directory entry."""
    return common_pb2.NodeInfo(
        node_id=node.node_id,
        organisation_name=node.organisation_name,
        organisation_id=node.organisation_id,
        endpoint=node.endpoint,
    )


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    """Serves ``transmural.v1.Registry`` over a node directory, an index and membership."""

    def __init__(
        self,
        directory: NodeDirectory,
        index: MasterPatientIndex,
        membership: Membership | None = None,
        authenticated: bool = False,
        network_key_check: bytes = b"",
    ) -> None:
        """``authenticated``: every call must come with a verified certificate
        (the server runs ``CertificateInterceptor``); a call without one is
        refused rather than trusted, should the interceptor ever be missing.
        ``network_key_check``: the network key's check, to refuse a node
        registering with another key (empty: not checked)."""
        self._network_key_check = network_key_check
        self._directory = directory
        self._index = index
        self._membership = membership
        self._authenticated = authenticated
        self._share = Share(
            const.MAX_CALLS_PER_NODE,
            lambda running: (
                f"busy: your node already has {running} calls running at the registry, the "
                "most one node may have at once; try again shortly"
            ),
        )

    def _caller(self) -> Caller | None:
        caller = current_caller()
        if self._authenticated and caller is None:
            raise PermissionDenied("this registry accepts only calls with a node certificate")
        return caller

    def _one_of_its_share(self, caller: Caller | None) -> AbstractContextManager[None]:
        """Hold one of the calling node's places while the call runs (Overloaded if none)."""
        return self._share.request(caller.identity.node_id if caller else "")

    @maps_errors
    async def RegisterNode(
        self, request: registry_pb2.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterNodeResponse:
        wire = request.node
        caller = self._caller()
        _check_network_key(self._network_key_check, request.network_key_check)
        if caller is None:
            record = NodeRecord(
                wire.node_id, wire.organisation_name, wire.organisation_id, wire.endpoint
            )
        else:
            certified = caller.identity
            record = NodeRecord(
                node_id=acting_node(wire.node_id, certified.node_id, "register as"),
                organisation_name=certified.organisation_name,
                organisation_id=certified.organisation_id,
                endpoint=wire.endpoint,
            )
        with self._one_of_its_share(caller):
            stored = await self._directory.register(record)
        return registry_pb2.RegisterNodeResponse(node=node_info(stored))

    @maps_errors
    async def Publish(
        self, request: registry_pb2.PublishRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.PublishResponse:
        caller = self._caller()
        node_id = acting_node(
            request.node_id, caller.identity.node_id if caller else None, "publish for"
        )
        changes = [IndexChange(e.pseudonym, e.withdrawn) for e in request.entries]
        with self._one_of_its_share(caller):
            result = await self._index.publish(node_id, changes)
        return registry_pb2.PublishResponse(published=result.published, withdrawn=result.withdrawn)

    @maps_errors
    async def Locate(
        self, request: registry_pb2.LocateRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.LocateResponse:
        with self._one_of_its_share(self._caller()):
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
        with self._one_of_its_share(self._caller()):
            nodes = await self._directory.list_nodes()
        return registry_pb2.ListNodesResponse(nodes=[node_info(n) for n in nodes])

    @maps_errors
    async def ListRevocations(
        self, request: registry_pb2.ListRevocationsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListRevocationsResponse:
        self._caller()
        records = await self._membership.revocations() if self._membership else []
        return registry_pb2.ListRevocationsResponse(
            revocations=[
                registry_pb2.Revocation(
                    serial=r.serial,
                    node_id=r.node_id,
                    organisation_id=r.organisation_id,
                    revoked_at=utc_iso(r.revoked_at),
                )
                for r in records
            ]
        )


class EnrolmentServicer(enrolment_pb2_grpc.EnrolmentServicer):
    """Serves ``transmural.v1.Enrolment`` on the join port (TLS, no client certificate)."""

    def __init__(self, membership: Membership, registry_endpoint: Callable[[], str]) -> None:
        """``registry_endpoint`` gives the mutual-TLS address a joined node should dial."""
        self._membership = membership
        self._registry_endpoint = registry_endpoint

    @maps_errors
    async def Join(
        self, request: enrolment_pb2.JoinRequest, context: grpc.aio.ServicerContext
    ) -> enrolment_pb2.JoinResponse:
        result = await self._membership.join(request.invite_secret, request.csr_der)
        member = result.member
        return enrolment_pb2.JoinResponse(
            certificate_der=result.certificate_der,
            ca_certificate_der=result.ca_certificate_der,
            wrapped_network_key=result.wrapped_network_key,
            node=common_pb2.NodeInfo(
                node_id=member.node_id,
                organisation_id=member.organisation_id,
                organisation_name=member.organisation_name,
            ),
            registry_endpoint=self._registry_endpoint(),
        )


def _check_network_key(expected: bytes, sent: bytes) -> None:
    """ConfigError when a node registers with another network key than the registry's."""
    if expected and sent and not hmac.compare_digest(sent, expected):
        raise ConfigError(
            "this node's network key is not this network's (replaced, or copied from "
            "another network): nothing it publishes could ever be found; restore the "
            "network.key it got when it joined"
        )
