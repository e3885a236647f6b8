"""The node's gRPC servicers: thin, validate and convert, then delegate.

``PeerServicer`` answers other nodes through the ``RecordHolder``;
``GatewayServicer`` serves the clinician's client through the ``Gateway``.
Every method goes through ``maps_errors``, the one error boundary.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

import grpc

from node.answers import FacilityAnswer, FacilityItemsAnswer, Located, Requester
from node.assertions import AssertionCheck
from node.convert import (
    document_to_proto,
    facility_to_proto,
    item_to_proto,
    status_to_proto,
)
from node.gateway import Gateway
from node.holder import Origin, RecordHolder
from node.share import clinician_share, facility_share
from node.users import Clinicians
from transmural.auth import current_caller
from transmural.const import FETCH_PIECE_BYTES
from transmural.errors import InvalidInput
from transmural.identifiers import Identifier, canonical
from transmural.pseudonym import is_pseudonym
from transmural.share import Share
from transmural.status import maps_errors
from transmural.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, peer_pb2, peer_pb2_grpc

CORRELATION_ID = re.compile(r"[0-9A-Za-z-]{1,64}")
PEER_SERVICE = "transmural.v1.Peer"
GATEWAY_SERVICE = "transmural.v1.Gateway"


class PeerServicer(peer_pb2_grpc.PeerServicer):
    """Other nodes' questions; the requester comes only from a verified assertion."""

    def __init__(
        self, holder: RecordHolder, check: AssertionCheck, share: Share | None = None
    ) -> None:
        self._holder = holder
        self._check = check
        self._share = share or facility_share()

    def _requester(
        self, signed: common_pb2.SignedAssertion, pseudonym: bytes, correlation_id: str
    ) -> Requester:
        if not is_pseudonym(pseudonym):
            raise InvalidInput("pseudonym must be 32 bytes")
        if not CORRELATION_ID.fullmatch(correlation_id):
            raise InvalidInput("correlation id must be 1 to 64 characters of [0-9a-zA-Z-]")
        return self._check.requester(signed.payload, signed.signature, pseudonym, current_caller())

    @maps_errors
    async def FindDocuments(
        self, request: peer_pb2.FindDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.FindDocumentsResponse:
        requester = self._requester(request.assertion, request.pseudonym, request.correlation_id)
        origin = _origin(context, request.correlation_id)
        with self._share.request(origin.node_id):
            answer = await self._holder.find_documents(request.pseudonym, requester, origin)
        return peer_pb2.FindDocumentsResponse(
            status=status_to_proto(answer.status),
            documents=[document_to_proto(d) for d in answer.documents],
        )

    @maps_errors
    async def FindItems(
        self, request: peer_pb2.FindItemsRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.FindItemsResponse:
        requester = self._requester(request.assertion, request.pseudonym, request.correlation_id)
        origin = _origin(context, request.correlation_id)
        with self._share.request(origin.node_id):
            answer = await self._holder.find_items(request.pseudonym, requester, origin)
        return peer_pb2.FindItemsResponse(
            status=status_to_proto(answer.status),
            items=[item_to_proto(i) for i in answer.items],
        )

    @maps_errors
    async def FetchDocument(
        self, request: peer_pb2.FetchDocumentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.DocumentChunk]:
        requester = self._requester(request.assertion, request.pseudonym, request.correlation_id)
        origin = _origin(context, request.correlation_id)
        with self._share.request(origin.node_id):
            document, chunks = await self._holder.open_document(
                request.pseudonym, request.document_id, requester, origin
            )
            metadata: common_pb2.DocumentMetadata | None = document_to_proto(document)
            async for data in chunks:
                yield common_pb2.DocumentChunk(metadata=metadata, data=data)
                metadata = None
            if metadata is not None:  # an empty document still says what it is
                yield common_pb2.DocumentChunk(metadata=metadata)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Clinicians' calls; the clinician comes only from the bearer token."""

    def __init__(
        self,
        gateway: Gateway,
        clinicians: Clinicians,
        national_system: str,
        organisation_id: str,
        share: Share | None = None,
    ) -> None:
        self._gateway = gateway
        self._clinicians = clinicians
        self._share = share or clinician_share()
        self._national_system = national_system
        self._organisation_id = organisation_id

    async def _requester(
        self,
        context: grpc.aio.ServicerContext,
        request: gateway_pb2.SearchRequest | gateway_pb2.GatewayFetchRequest,
    ) -> Requester:
        user = await self._clinicians.authenticate(_bearer_token(context), context.peer() or "")
        return Requester(
            clinician_id=user.user_id,
            display_name=user.display_name,
            role=user.role,
            organisation_id=self._organisation_id,
            purpose_of_use=request.purpose_of_use or "treatment",
            reason=request.reason,
            on_behalf_of=request.on_behalf_of,
        )

    @maps_errors
    async def Search(
        self, request: gateway_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.SearchEvent]:
        requester = await self._requester(context, request)
        identifier = self._identifier(request.patient)
        deadline_s = request.deadline_ms / 1000 if request.deadline_ms else None
        with self._share.request(requester.clinician_id):
            async for event in self._gateway.search(identifier, requester, deadline_s):
                yield _search_event(event)

    @maps_errors
    async def Report(
        self, request: gateway_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.ReportEvent]:
        requester = await self._requester(context, request)
        identifier = self._identifier(request.patient)
        deadline_s = request.deadline_ms / 1000 if request.deadline_ms else None
        with self._share.request(requester.clinician_id):
            async for event in self._gateway.report(identifier, requester, deadline_s):
                yield _report_event(event)

    @maps_errors
    async def FetchDocument(
        self, request: gateway_pb2.GatewayFetchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.DocumentChunk]:
        if not request.node_id or not request.document_id:
            raise InvalidInput("a fetch names both the facility (node id) and the document id")
        requester = await self._requester(context, request)
        identifier = self._identifier(request.patient)
        pieces = self._gateway.fetch(identifier, request.node_id, request.document_id, requester)
        # aclosing: a clinician who goes away ends the fetch from the facility at once.
        with self._share.request(requester.clinician_id):
            async with contextlib.aclosing(pieces):
                async for metadata, data in pieces:
                    if len(data) > FETCH_PIECE_BYTES:
                        raise InvalidInput("the facility sent an oversized chunk")
                    chunk = common_pb2.DocumentChunk(data=data)
                    if metadata is not None:
                        chunk.metadata.CopyFrom(document_to_proto(metadata))
                    yield chunk

    def _identifier(self, patient: common_pb2.PatientIdentifier) -> Identifier:
        return canonical(patient.system or self._national_system, patient.value)


def _origin(context: grpc.aio.ServicerContext, correlation_id: str) -> Origin:
    """The calling node (verified certificate) and its address, for the audit record."""
    caller = current_caller()
    return Origin(
        node_id=caller.identity.node_id if caller else "(insecure-dev: unverified)",
        address=context.peer() or "",
        correlation_id=correlation_id,
    )


def _bearer_token(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def _located(event: Located) -> gateway_pb2.Located:
    return gateway_pb2.Located(
        holders=[facility_to_proto(f) for f in event.holders],
        correlation_id=event.correlation_id,
        incomplete=event.incomplete,
    )


def _search_event(event: Located | FacilityAnswer) -> gateway_pb2.SearchEvent:
    if isinstance(event, Located):
        return gateway_pb2.SearchEvent(located=_located(event))
    return gateway_pb2.SearchEvent(
        result=gateway_pb2.FacilityResult(
            facility=facility_to_proto(event.facility),
            status=status_to_proto(event.status),
            message=event.message,
            elapsed_ms=event.elapsed_ms,
            documents=[document_to_proto(d) for d in event.documents],
        )
    )


def _report_event(event: Located | FacilityItemsAnswer) -> gateway_pb2.ReportEvent:
    if isinstance(event, Located):
        return gateway_pb2.ReportEvent(located=_located(event))
    return gateway_pb2.ReportEvent(
        items=gateway_pb2.FacilityItems(
            facility=facility_to_proto(event.facility),
            status=status_to_proto(event.status),
            message=event.message,
            elapsed_ms=event.elapsed_ms,
            items=[item_to_proto(i) for i in event.items],
        )
    )
