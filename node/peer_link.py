"""The gRPC side of asking other nodes: one long-lived channel per peer.

A new connection costs several times a call on an open channel, so
channels are kept and reused. Transport failures are turned into the
facility statuses the clinician sees: a deadline becomes ``timeout``, a
refused or dead connection ``unreachable``, anything else ``error``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol, TypeVar

import grpc

from node import const
from node.answers import Facility, Requester, Status
from node.assertions import AssertionSigner
from node.clinical_items import ClinicalItem
from node.convert import document_from_proto, item_from_proto, status_from_proto
from node.records import DocumentRecord
from transmural import pki, transport
from transmural.errors import InvalidInput, NotFound, PermissionDenied, TransmuralError, Unavailable
from transmural.status import from_server
from transmural.v1 import common_pb2, peer_pb2, peer_pb2_grpc

log = logging.getLogger(__name__)


class _Answer(Protocol):
    """A peer's unary answer (FindDocumentsResponse, FindItemsResponse)."""

    @property
    def status(self) -> common_pb2.FacilityStatus: ...


Response = TypeVar("Response", bound=_Answer)

_PEER_STATUS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: Status.TIMEOUT,
    grpc.StatusCode.UNAVAILABLE: Status.UNREACHABLE,
}


class PeerChannels:
    """Channels to peers, opened on first use and kept; every call signed.

    A channel is keyed by endpoint and node id: TLS checks that the peer's
    certificate names that node (``<id>.node.transmural``), so a facility
    answering at an address the registry gave for another is refused.
    """

    def __init__(self, tls: transport.TlsFiles | None, signer: AssertionSigner) -> None:
        self._tls = tls
        self._signer = signer
        self._stubs: dict[tuple[str, str], peer_pb2_grpc.PeerStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._warned: set[str] = set()

    def stub(self, facility: Facility) -> peer_pb2_grpc.PeerStub:
        key = (facility.endpoint, facility.node_id)
        stub = self._stubs.get(key)
        if stub is None:
            channel = transport.open_channel(
                facility.endpoint, self._tls, pki.node_dns_name(facility.node_id)
            )
            self._channels.append(channel)
            stub = self._stubs[key] = peer_pb2_grpc.PeerStub(channel)
        return stub

    def _assertion(
        self, requester: Requester, pseudonym: bytes, facility: Facility
    ) -> common_pb2.SignedAssertion:
        payload, signature = self._signer.sign(requester, pseudonym, facility.node_id)
        return common_pb2.SignedAssertion(payload=payload, signature=signature)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self._stubs.clear()

    async def find_documents(
        self,
        facility: Facility,
        pseudonym: bytes,
        requester: Requester,
        correlation_id: str,
        deadline_s: float,
    ) -> tuple[Status, str, list[DocumentRecord]]:
        request = peer_pb2.FindDocumentsRequest(
            pseudonym=pseudonym,
            correlation_id=correlation_id,
            assertion=self._assertion(requester, pseudonym, facility),
        )
        status, message, response = await self._ask(
            facility, self.stub(facility).FindDocuments, request, deadline_s
        )
        documents = [] if response is None else response.documents
        return status, message, [document_from_proto(d) for d in documents]

    async def find_items(
        self,
        facility: Facility,
        pseudonym: bytes,
        requester: Requester,
        correlation_id: str,
        deadline_s: float,
    ) -> tuple[Status, str, list[ClinicalItem]]:
        request = peer_pb2.FindItemsRequest(
            pseudonym=pseudonym,
            correlation_id=correlation_id,
            assertion=self._assertion(requester, pseudonym, facility),
        )
        status, message, response = await self._ask(
            facility, self.stub(facility).FindItems, request, deadline_s
        )
        items = [] if response is None else response.items
        return status, message, [item_from_proto(i) for i in items]

    async def _ask(
        self,
        facility: Facility,
        method: Callable[..., Awaitable[Response]],
        request: object,
        deadline_s: float,
    ) -> tuple[Status, str, Response | None]:
        """One unary question to a peer: (status, message, response or None).

        A transport failure or an answer this node does not understand comes
        back as a status with no response; the response is there only with
        OK, so a refusal can never carry data on.
        """
        try:
            response = await method(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as error:
            self._note_failure(facility, error)
            if from_server(error):  # it answered, with a refusal or its own failure
                return Status.ERROR, f"{error.code().name}: {error.details() or ''}", None
            return _PEER_STATUS.get(error.code(), Status.ERROR), _describe(error), None
        self._warned.discard(facility.node_id)
        answered = status_from_proto(response.status)
        if answered not in (Status.OK, Status.NO_RECORD, Status.CONSENT_DENIED):
            return Status.ERROR, "the facility sent an answer this node does not understand", None
        return answered, "", response if answered is Status.OK else None

    async def fetch_document(
        self,
        facility: Facility,
        pseudonym: bytes,
        document_id: str,
        requester: Requester,
        correlation_id: str,
    ) -> AsyncGenerator[tuple[DocumentRecord | None, bytes]]:
        request = peer_pb2.FetchDocumentRequest(
            pseudonym=pseudonym,
            document_id=document_id,
            correlation_id=correlation_id,
            assertion=self._assertion(requester, pseudonym, facility),
        )
        call = self.stub(facility).FetchDocument(request, timeout=const.FETCH_DEADLINE_S)
        try:
            async for chunk in call:
                metadata = (
                    document_from_proto(chunk.metadata) if chunk.HasField("metadata") else None
                )
                yield metadata, chunk.data
        except grpc.aio.AioRpcError as error:
            raise _domain_error(facility, error) from None

    def _note_failure(self, facility: Facility, error: grpc.aio.AioRpcError) -> None:
        """Log a failing peer once at WARNING, then at DEBUG until it recovers."""
        level = logging.DEBUG if facility.node_id in self._warned else logging.WARNING
        self._warned.add(facility.node_id)
        log.log(level, "peer %s (%s): %s", facility.node_id, facility.endpoint, error.code().name)


def _describe(error: grpc.aio.AioRpcError) -> str:
    code = error.code()
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer before the deadline"
    if code is grpc.StatusCode.UNAVAILABLE:
        return "could not connect to the facility"
    return f"{code.name}: {error.details() or 'no detail'}"


def _domain_error(facility: Facility, error: grpc.aio.AioRpcError) -> TransmuralError:
    """A peer's fetch failure as the error the gateway hands to its client."""
    code, detail = error.code(), error.details() or ""
    where = f"facility {facility.node_id}"
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{where}: {detail}")
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"{where}: {detail}")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(f"{where}: {detail}")
    return Unavailable(f"{where}: {_describe(error)}")
