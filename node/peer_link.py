"""The gRPC side of asking other nodes: one long-lived channel per peer.

A new connection costs several times a call on an open channel, so
channels are kept and reused. Transport failures are turned into the
facility statuses the clinician sees: a deadline becomes ``timeout``, a
refused or dead connection ``unreachable``, anything else ``error``.

A peer that failed on the transport (``peer_health``) is not asked again
until its back-off window ends: the call answers at once, without
touching the network, with the last failure and when it is retried.

grpc has a reconnect back-off of its own: a channel whose connection
failed sits in TRANSIENT_FAILURE, fails calls at once and keeps dialling
in the background, waiting up to 120 s between attempts. Left alone, that
would make a recovered peer look dead for up to two minutes after our own
window ended, and dial dead peers nobody asks for. So a channel found in
TRANSIENT_FAILURE after a failure (or before a probe) is closed: while a
peer backs off this node holds no failed channel to it, and the probe
dials a fresh one, which costs one handshake per window. A channel to a
peer that merely timed out stays open: its connection works, and other
calls may be on their way over it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from node import const
from node.answers import Facility, Requester, Status
from node.assertions import AssertionSigner
from node.clinical_items import ClinicalItem
from node.convert import document_from_proto, item_from_proto, status_from_proto
from node.peer_health import Attempt, NotAsked, PeerHealth
from node.records import DocumentRecord
from transmural import pki, transport
from transmural.clock import Clock, SystemClock
from transmural.errors import InvalidInput, NotFound, PermissionDenied, TransmuralError, Unavailable
from transmural.status import from_server
from transmural.v1 import common_pb2, peer_pb2, peer_pb2_grpc

log = logging.getLogger(__name__)


class _Answer(Protocol):
    """A peer's unary answer (FindDocumentsResponse, FindItemsResponse)."""

    @property
    def status(self) -> common_pb2.FacilityStatus: ...


Response = TypeVar("Response", bound=_Answer)
#: Picks the method to call from a peer's stub (the stub may be replaced).
Pick = Callable[[peer_pb2_grpc.PeerStub], Callable[..., Awaitable[Response]]]

_PEER_STATUS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: Status.TIMEOUT,
    grpc.StatusCode.UNAVAILABLE: Status.UNREACHABLE,
}


@dataclass(frozen=True, slots=True)
class _Link:
    channel: grpc.aio.Channel
    stub: peer_pb2_grpc.PeerStub


class PeerChannels:
    """Channels to peers, opened on first use and kept; every call signed.

    A channel is keyed by endpoint and node id: TLS checks that the peer's
    certificate names that node (``<id>.node.transmural``), so a facility
    answering at an address the registry gave for another is refused.
    Failures are remembered under the same key (``PeerHealth``).
    """

    def __init__(
        self,
        tls: transport.TlsFiles | None,
        signer: AssertionSigner,
        clock: Clock | None = None,
        health: PeerHealth | None = None,
    ) -> None:
        self._tls = tls
        self._signer = signer
        self._health = health or PeerHealth(clock or SystemClock())
        self._links: dict[tuple[str, str], _Link] = {}
        self._warned: set[str] = set()

    def stub(self, facility: Facility) -> peer_pb2_grpc.PeerStub:
        key = _key(facility)
        link = self._links.get(key)
        if link is None:
            channel = transport.open_channel(
                facility.endpoint, self._tls, pki.node_dns_name(facility.node_id)
            )
            link = self._links[key] = _Link(channel, peer_pb2_grpc.PeerStub(channel))
        return link.stub

    def _assertion(
        self, requester: Requester, pseudonym: bytes, facility: Facility
    ) -> common_pb2.SignedAssertion:
        payload, signature = self._signer.sign(requester, pseudonym, facility.node_id)
        return common_pb2.SignedAssertion(payload=payload, signature=signature)

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.channel.close()

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
            facility, lambda stub: stub.FindDocuments, request, deadline_s
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
            facility, lambda stub: stub.FindItems, request, deadline_s
        )
        items = [] if response is None else response.items
        return status, message, [item_from_proto(i) for i in items]

    async def _ask(
        self,
        facility: Facility,
        pick: Pick[Response],
        request: object,
        deadline_s: float,
    ) -> tuple[Status, str, Response | None]:
        """One unary question to a peer: (status, message, response or None).

        A transport failure, a peer backing off or an answer this node does
        not understand comes back as a status with no response; the response
        is there only with OK, so a refusal can never carry data on.
        """
        attempt = self._health.admit(_key(facility))
        if isinstance(attempt, NotAsked):
            return attempt.status, attempt.message, None
        try:
            async with self._asking(facility, attempt, deadline_s) as stub:
                response = await pick(stub)(request, timeout=deadline_s, wait_for_ready=False)
        except grpc.aio.AioRpcError as error:
            if from_server(error):  # it answered, with a refusal or its own failure
                return Status.ERROR, f"{error.code().name}: {error.details() or ''}", None
            return _PEER_STATUS.get(error.code(), Status.ERROR), _describe(error), None
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
        """The document's chunks; Unavailable at once while the facility backs off."""
        attempt = self._health.admit(_key(facility))
        if isinstance(attempt, NotAsked):
            raise Unavailable(f"facility {facility.node_id}: {attempt.message}")
        request = peer_pb2.FetchDocumentRequest(
            pseudonym=pseudonym,
            document_id=document_id,
            correlation_id=correlation_id,
            assertion=self._assertion(requester, pseudonym, facility),
        )
        try:
            async with self._asking(facility, attempt, const.FETCH_DEADLINE_S) as stub:
                call = stub.FetchDocument(
                    request, timeout=const.FETCH_DEADLINE_S, wait_for_ready=False
                )
                async for chunk in call:
                    # Reached: a long download must not keep others from probing.
                    self._reached(facility, attempt)
                    metadata = (
                        document_from_proto(chunk.metadata) if chunk.HasField("metadata") else None
                    )
                    yield metadata, chunk.data
        except grpc.aio.AioRpcError as error:
            raise _domain_error(facility, error) from None

    @contextlib.asynccontextmanager
    async def _asking(
        self, facility: Facility, attempt: Attempt, deadline_s: float
    ) -> AsyncIterator[peer_pb2_grpc.PeerStub]:
        """The stub for one admitted call; how the call ended is noted on leaving.

        Anything but a gRPC error or a clean end (a cancelled search, a
        closed stream) leaves no verdict, so a probe cut short frees the way
        for the next one.
        """
        try:
            if attempt.probe:
                await self._drop_if_failing(facility)
            yield self.stub(facility)
        except grpc.aio.AioRpcError as error:
            await self._failed(facility, attempt, error, deadline_s)
            raise
        except BaseException:
            self._health.abandoned(attempt)
            raise
        self._reached(facility, attempt)

    def _reached(self, facility: Facility, attempt: Attempt) -> None:
        if self._health.answered(attempt):
            log.info("peer %s (%s) answers again", facility.node_id, facility.endpoint)
        self._warned.discard(facility.node_id)

    async def _failed(
        self, facility: Facility, attempt: Attempt, error: grpc.aio.AioRpcError, deadline_s: float
    ) -> None:
        """Back off after a transport failure; any answer from the peer proves it is there."""
        self._note_failure(facility, error)
        code = error.code()
        if from_server(error) or code not in _PEER_STATUS:
            if code is grpc.StatusCode.CANCELLED and not from_server(error):
                self._health.abandoned(attempt)  # our side gave up: says nothing of the peer
            else:
                self._health.answered(attempt)
            return
        window = self._health.failed(attempt, _PEER_STATUS[code], _describe(error), deadline_s)
        if window is not None:
            log.info("peer %s: not asked for %.1f s", facility.node_id, window)
        if code is grpc.StatusCode.UNAVAILABLE:
            await self._drop_if_failing(facility)

    async def _drop_if_failing(self, facility: Facility) -> None:
        """Close the channel if grpc holds it in TRANSIENT_FAILURE (see module doc)."""
        link = self._links.get(_key(facility))
        if link is None:
            return
        if link.channel.get_state() is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            del self._links[_key(facility)]
            await link.channel.close()

    def _note_failure(self, facility: Facility, error: grpc.aio.AioRpcError) -> None:
        """Log a failing peer once at WARNING, then at DEBUG until it recovers."""
        level = logging.DEBUG if facility.node_id in self._warned else logging.WARNING
        self._warned.add(facility.node_id)
        log.log(level, "peer %s (%s): %s", facility.node_id, facility.endpoint, error.code().name)


def _key(facility: Facility) -> tuple[str, str]:
    return facility.endpoint, facility.node_id


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
