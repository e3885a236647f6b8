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

While a peer backs off, one task (``_watch``) asks the standard gRPC
health service every node serves whether it is up again, about once a
second, each time on a fresh channel (a kept one would sit in grpc's
reconnect back-off) and within CHECK_TIMEOUT_S: a facility restarted on
its old address is found within a second or two, not at the end of a
window (``peer_health`` decides what a check proves). The task ends with
the window or when the channels close, so a peer nobody asks for is not
dialled for longer than one window.

A fetch may stream for minutes, but each chunk must come within the
deadline the gateway gives: a facility that goes silent mid-fetch (frozen,
hung) has failed like one that timed out on a search, so the next fetch
or search is answered at once instead of waiting the deadline again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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

#: A background health check of a backing-off peer gives up after this long.
CHECK_TIMEOUT_S = 2.0
#: A peer that timed out (a search's deadline, a fetch's silent chunk), in the clinician's words.
_NO_ANSWER = "no answer before the deadline"


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


class _Silent(Exception):
    """A fetch's next chunk did not come within its deadline."""


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
        self._watches: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._closed = False

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
        """Stop the health checks, then close every channel."""
        self._closed = True
        watches, self._watches = list(self._watches.values()), {}
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
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
                return Status.ERROR, _refusal(error), None
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
        chunk_deadline_s: float,
    ) -> AsyncGenerator[tuple[DocumentRecord | None, bytes]]:
        """The document's chunks, each within ``chunk_deadline_s`` (module doc).

        Unavailable at once while the facility backs off, and when a chunk
        is late: a facility that goes silent is reported in seconds, while
        a large document may take minutes.
        """
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
            async with self._asking(facility, attempt, chunk_deadline_s) as stub:
                call = stub.FetchDocument(
                    request, timeout=const.FETCH_DEADLINE_S, wait_for_ready=False
                )
                try:
                    while (chunk := await _next_chunk(call, chunk_deadline_s)) is not None:
                        # Reached: a long download must not keep others from probing.
                        self._reached(facility, attempt)
                        metadata = (
                            document_from_proto(chunk.metadata)
                            if chunk.HasField("metadata")
                            else None
                        )
                        yield metadata, chunk.data
                finally:
                    # Closed early (the clinician went away): end the facility's
                    # stream now, not at its deadline, and stop buffering it.
                    call.cancel()
        except grpc.aio.AioRpcError as error:
            raise _domain_error(facility, error) from None
        except _Silent:
            raise Unavailable(
                f"facility {facility.node_id} did not answer within {chunk_deadline_s:g} s"
            ) from None

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
        except _Silent:
            self._note_failure(facility, "no chunk within the deadline")
            self._back_off(facility, attempt, Status.TIMEOUT, _NO_ANSWER, deadline_s)
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
        code = error.code()
        self._note_failure(facility, code.name)
        if from_server(error) or code not in _PEER_STATUS:
            if code is grpc.StatusCode.CANCELLED and not from_server(error):
                self._health.abandoned(attempt)  # our side gave up: says nothing of the peer
            else:
                self._health.answered(attempt)
            return
        self._back_off(facility, attempt, _PEER_STATUS[code], _describe(error), deadline_s)
        if code is grpc.StatusCode.UNAVAILABLE:
            await self._drop_if_failing(facility)

    def _back_off(
        self, facility: Facility, attempt: Attempt, status: Status, what: str, deadline_s: float
    ) -> None:
        """Count a transport failure; while the peer backs off, watch for it coming back."""
        window = self._health.failed(attempt, status, what, deadline_s)
        if window is not None:
            log.info("peer %s: not asked for %.1f s", facility.node_id, window)
        key = _key(facility)
        if self._closed or key in self._watches or self._health.window_left(key) is None:
            return
        self._watches[key] = asyncio.create_task(
            self._watch(facility), name=f"peer-watch-{facility.node_id}"
        )

    async def _watch(self, facility: Facility) -> None:
        """Health-check a backing-off peer about once a second until its window ends."""
        key = _key(facility)
        try:
            while (left := self._health.window_left(key)) is not None:
                await asyncio.sleep(min(self._health.check_delay(), left))
                if self._health.window_left(key) is None:
                    return  # over, or a call is probing: the call decides
                if self._health.checked(key, await self._serving(facility)):
                    log.info("peer %s serves again: the next call asks it", facility.node_id)
        finally:
            if self._watches.get(key) is asyncio.current_task():
                del self._watches[key]

    async def _serving(self, facility: Facility) -> bool:
        """One standard health check on a fresh channel: does the peer say SERVING?

        The status is read (``transport.health_check`` would only say that
        something answered): a node on its way down may answer NOT_SERVING.
        """
        channel = transport.open_channel(
            facility.endpoint, self._tls, pki.node_dns_name(facility.node_id)
        )
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            return False
        finally:
            await channel.close()
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def _drop_if_failing(self, facility: Facility) -> None:
        """Close the channel if grpc holds it in TRANSIENT_FAILURE (see module doc)."""
        link = self._links.get(_key(facility))
        if link is None:
            return
        if link.channel.get_state() is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            del self._links[_key(facility)]
            await link.channel.close()

    def _note_failure(self, facility: Facility, what: str) -> None:
        """Log a failing peer once at WARNING, then at DEBUG until it recovers."""
        level = logging.DEBUG if facility.node_id in self._warned else logging.WARNING
        self._warned.add(facility.node_id)
        log.log(level, "peer %s (%s): %s", facility.node_id, facility.endpoint, what)


def _key(facility: Facility) -> tuple[str, str]:
    return facility.endpoint, facility.node_id


async def _next_chunk(
    call: grpc.aio.UnaryStreamCall, deadline_s: float
) -> common_pb2.DocumentChunk | None:
    """The stream's next chunk, None at its end; _Silent when none came in time.

    A cancelled read cancels the call (grpc does), so the stream is not left open.
    """
    try:
        async with asyncio.timeout(deadline_s):
            chunk = await call.read()
    except TimeoutError:
        raise _Silent from None
    return None if chunk is grpc.aio.EOF else chunk


def _refusal(error: grpc.aio.AioRpcError) -> str:
    """What a facility that answered with an error said; "busy" needs no status code."""
    detail = error.details() or ""
    if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and detail:
        return detail
    return f"{error.code().name}: {detail}"


def _describe(error: grpc.aio.AioRpcError) -> str:
    code = error.code()
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return _NO_ANSWER
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
    return Unavailable(f"{where}: {_refusal(error) if from_server(error) else _describe(error)}")
