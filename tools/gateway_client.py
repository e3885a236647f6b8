"""The clinician's side of the Gateway service, as plain Python.

Used by the ``transmural`` command and by the demo; returns dataclasses
and raises ``ClientError`` with a message fit for a terminal. ``search``
and ``report`` stream the same way: first ``Holders`` (whom the registry
listed), then one answer per facility as it arrives.

Every call first waits for a connection to the node (``CONNECT_TIMEOUT_S``),
and when there is none says which it is: nothing listens there, something
answers with a certificate not from your network's CA, or one naming
another node, or nothing answers in time (a hung node). Once connected, a
node that stops answering is given up on too: a search or report after the
time the node itself bounds (``search_timeout_s``), a fetch after
``FETCH_IDLE_S`` without a chunk. Errors from the node itself carry
``ERROR_ORIGIN_KEY`` (``transmural.status.from_server``): its UNAVAILABLE
or DEADLINE_EXCEEDED means the registry or a facility behind it did not
answer (exit 5), not that the node is unreachable (exit 3).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node import const as node_const
from transmural import pki, transport
from transmural.errors import InvalidIdentifier
from transmural.identifiers import canonical
from transmural.status import from_server
from transmural.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

STATUS_NAMES = {
    common_pb2.FACILITY_STATUS_OK: "ok",
    common_pb2.FACILITY_STATUS_NO_RECORD: "no-record",
    common_pb2.FACILITY_STATUS_CONSENT_DENIED: "consent-denied",
    common_pb2.FACILITY_STATUS_TIMEOUT: "timeout",
    common_pb2.FACILITY_STATUS_UNREACHABLE: "unreachable",
    common_pb2.FACILITY_STATUS_ERROR: "error",
}


GATEWAY_SERVICE = "transmural.v1.Gateway"
#: How long ``check`` waits for the node's health answer.
CHECK_TIMEOUT_S = 5.0
#: How long every call waits to connect to your node (TCP and TLS) before it
#: says the node did not answer: grpc alone would wait 20 s, then blame the CA.
CONNECT_TIMEOUT_S = 5.0

#: OpenSSL verify codes (``ssl.SSLCertVerificationError.verify_code``) told apart;
#: any other is a certificate not signed by the CA given.
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_HOSTNAME_MISMATCH = 62

#: Exit code when the network behind your node could not answer (registry or facility).
NETWORK_UNAVAILABLE = 5

#: What the node itself bounds (``node.const``): a registry locate, then each
#: facility's answer (at most MAX_PEER_DEADLINE_S, the default when a search
#: names no deadline, since a node may be configured up to it).
REGISTRY_DEADLINE_S = node_const.REGISTRY_DEADLINE_S
MAX_PEER_DEADLINE_S = node_const.MAX_PEER_DEADLINE_S
#: Added to what the node bounds before the client gives up on it.
NODE_MARGIN_S = 5.0
#: Longest a fetch may go without a chunk: the node bounds each chunk by the
#: facility deadline, after a registry locate. Silence past it means the node
#: itself hangs.
FETCH_IDLE_S = MAX_PEER_DEADLINE_S + REGISTRY_DEADLINE_S + NODE_MARGIN_S
#: Longest token sent. Tokens from ``transmural-admin user add`` are 48
#: characters (``tmu1_`` + 43); a single-sign-on token (e.g. an OIDC JWT) runs
#: to a few kB. grpc refuses request headers past 8 to 16 kB with its own text.
MAX_TOKEN_CHARS = 4096


class ClientError(Exception):
    """A failure to show the clinician; ``exit_code`` for the command."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class NodeAccess:
    """How to reach and sign in to one's own node's gateway."""

    address: str  # host:port of the node's gateway port
    token: str  # the clinician's bearer token (transmural-admin user add)
    ca_pem: bytes | None  # the network CA; None only for an --insecure-dev node
    node_id: str = ""  # checked against the node's certificate when given


@dataclass(frozen=True, slots=True)
class Document:
    document_id: str
    title: str
    type_code: str
    type_display: str
    content_type: str
    size: int
    sha256: str
    created: str
    author_organisation: str


@dataclass(frozen=True, slots=True)
class FacilityResult:
    node_id: str
    organisation: str
    status: str
    elapsed_ms: int
    message: str = ""
    documents: list[Document] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ClinicalItem:
    """One structured entry of a facility's record (proto ``ClinicalItem``)."""

    section: str
    code_system: str
    code: str
    display: str
    status: str
    date: str
    value: str = ""
    unit: str = ""
    resource_id: str = ""
    resource_json: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class FacilityItems:
    """What one facility answered to a report: its status and structured entries."""

    node_id: str
    organisation: str
    status: str
    elapsed_ms: int
    message: str = ""
    organisation_id: str = ""
    items: list[ClinicalItem] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Holders:
    """First event of a search: which facilities the registry listed."""

    node_ids: list[str]
    organisations: list[str]
    correlation_id: str
    #: Why the list may be incomplete (registry unreachable); "" when it is not.
    incomplete: str = ""


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as host and port; ClientError (exit 2) otherwise."""
    host, colon, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if (
        not colon
        or not host
        or any(c.isspace() or not c.isprintable() for c in address)
        or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)
    ):
        raise ClientError(
            f"the node address {address!r} is not HOST:PORT (e.g. node.example:7200)", 2
        )
    return host, int(port)


def split_token(text: str) -> common_pb2.PatientIdentifier:
    """``system|value`` or a bare value (the node's national system).

    A value under a named system is checked here, with the same rules the
    node applies, so a mistyped BSN is refused before any network call. A
    bare value is checked by the node: only it knows its national system.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ClientError("the identifier is not valid UTF-8 text", 2) from None
    if "|" not in text:
        if not text.strip():
            raise ClientError("the identifier is empty", 2)
        return common_pb2.PatientIdentifier(value=text)
    system, _, value = text.rpartition("|")
    if not system.strip():
        raise ClientError(
            "the identifier has an empty system: write system|value, or the bare value", 2
        )
    try:
        canonical(system, value)
    except InvalidIdentifier as error:
        raise ClientError(f"invalid identifier: {error}", 2) from None
    return common_pb2.PatientIdentifier(system=system, value=value)


class GatewayClient:
    """A connection to the clinician's own node, signed in with a bearer token."""

    def __init__(self, access: NodeAccess) -> None:
        self.address = access.address
        self._access = access
        tls = None if access.ca_pem is None else transport.TlsFiles(access.ca_pem)
        server_name = pki.node_dns_name(access.node_id) if access.node_id else "localhost"
        self._server_name = server_name
        self._channel = transport.open_channel(access.address, tls, server_name)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._metadata = (("authorization", f"Bearer {access.token}"),)

    async def close(self) -> None:
        await self._channel.close()

    async def _connect(self) -> None:
        """Return once the channel to the node is ready, else say why it is not.

        Waits at most CONNECT_TIMEOUT_S (a node that accepts the connection
        and never speaks: "did not answer in time"). When grpc's attempt
        fails, one connection of our own tells why (``_why_not_connected``).
        """
        ready = grpc.ChannelConnectivity.READY
        state = self._channel.get_state(try_to_connect=True)
        if state is ready:
            return
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                while state is not ready:
                    if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                        raise await self._why_not_connected()
                    await self._channel.wait_for_state_change(state)
                    state = self._channel.get_state(try_to_connect=True)
        except TimeoutError:
            raise ClientError(
                f"your node at {self.address} did not answer in time (no connection within "
                f"{CONNECT_TIMEOUT_S:g} s): is it stopped, hung or overloaded?", 3,
            ) from None  # fmt: skip

    async def _why_not_connected(self) -> ClientError:
        """Connect once ourselves (TCP, then TLS as grpc does) and say what failed.

        grpc reports every failure to connect alike; Python's own socket and
        TLS errors tell a node that is not running from one whose certificate
        is not your network's or names another node.
        """
        host, port = split_address(self.address)
        context = None
        if self._access.ca_pem is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and name
            context.load_verify_locations(cadata=self._access.ca_pem.decode("ascii", "replace"))
            context.set_alpn_protocols(["h2"])
        unreachable = f"cannot reach your node at {self.address}"
        try:
            _, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=self._server_name if context else None
            )
        except ssl.SSLCertVerificationError as error:
            return ClientError(
                f"{self.address} is not your node: {self._refused_certificate(error)} "
                f"({error.verify_message})", 3,
            )  # fmt: skip
        except ssl.SSLError as error:
            return ClientError(
                f"{self.address} answers, but not with TLS as a Transmural gateway "
                f"({error.reason or error}): is it your node's gateway port?", 3,
            )  # fmt: skip
        except ConnectionRefusedError:
            return ClientError(
                f"{unreachable}: connection refused (is the node running, and is that its "
                "gateway port?)", 3,
            )  # fmt: skip
        except socket.gaierror:
            return ClientError(f"{unreachable}: unknown host {host}", 3)
        except OSError as error:
            return ClientError(f"{unreachable}: {error.strerror or error}", 3)
        writer.transport.abort()  # a polite TLS close could wait for the server
        plain = " (does it run with TLS? leave out --insecure-dev)" if context is None else ""
        return ClientError(
            f"your node at {self.address} accepts connections, but gRPC over them failed: is "
            f"that its gateway port{plain}?", 3,
        )  # fmt: skip

    def _refused_certificate(self, error: ssl.SSLCertVerificationError) -> str:
        """Why the node's certificate was refused, from OpenSSL's verify code."""
        if error.verify_code == X509_V_ERR_HOSTNAME_MISMATCH:
            return f"its certificate names another node, not {self._access.node_id}"
        if error.verify_code in (X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED):
            return "its certificate is not valid now (expired, or not yet valid)"
        return "its certificate is not from your network's CA"

    async def check(self) -> None:
        """Ask the standard gRPC health service whether the Gateway serves here.

        It proves the address answers, its certificate comes from the given
        CA and names the given node id (TLS), and the port is a Transmural
        gateway. It sends no token and touches no patient: the token is
        only checked by the first search or report, which is audited.
        """
        await self._connect()
        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=GATEWAY_SERVICE)
        try:
            answer = await stub.Check(request, timeout=CHECK_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                raise ClientError(
                    f"{self.address} answers, but not as a Transmural gateway "
                    "(is it the node's peer port, or another service?)", 3,
                ) from None  # fmt: skip
            raise self._client_error(error) from None
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            raise ClientError(f"the gateway at {self.address} is not serving yet", 3)

    async def search(
        self,
        identifier: str,
        purpose: str = "treatment",
        deadline_ms: int = 0,
        reason: str = "",
    ) -> AsyncIterator[Holders | FacilityResult]:
        request = _search_request(identifier, purpose, deadline_ms, reason)
        timeout_s = search_timeout_s(deadline_ms)
        await self._connect()
        try:
            async for event in self._stub.Search(
                request, timeout=timeout_s, metadata=self._metadata
            ):
                if event.HasField("located"):
                    yield _holders(event.located)
                else:
                    yield _result(event.result)
        except grpc.aio.AioRpcError as error:
            raise self._client_error(error, "search", timeout_s) from None

    async def report(
        self,
        identifier: str,
        purpose: str = "treatment",
        deadline_ms: int = 0,
        reason: str = "",
    ) -> AsyncIterator[Holders | FacilityItems]:
        """The live report's fan-out: like ``search``, with structured entries per facility."""
        request = _search_request(identifier, purpose, deadline_ms, reason)
        timeout_s = search_timeout_s(deadline_ms)
        await self._connect()
        try:
            async for event in self._stub.Report(
                request, timeout=timeout_s, metadata=self._metadata
            ):
                if event.HasField("located"):
                    yield _holders(event.located)
                else:
                    yield _items(event.items)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.UNIMPLEMENTED:
                raise ClientError(
                    f"your node at {self.address} does not offer the live report "
                    "(Gateway.Report): it runs an older Transmural", 3,
                ) from None  # fmt: skip
            raise self._client_error(error, "report", timeout_s) from None

    async def fetch(
        self,
        identifier: str,
        node_id: str,
        document_id: str,
        out: BinaryIO,
        purpose: str = "treatment",
        reason: str = "",
        progress: Callable[[int, int], None] | None = None,
    ) -> Document:
        """Write the document to ``out``; checks its size and SHA-256.

        ``progress(received, expected)`` is called after every chunk, with
        the size the facility listed (0 if it listed none). A node silent
        for FETCH_IDLE_S (no chunk, no end) is given up on: exit 3.
        """
        request = gateway_pb2.GatewayFetchRequest(
            patient=split_token(identifier),
            node_id=node_id,
            document_id=document_id,
            purpose_of_use=purpose,
            reason=reason,
        )
        digest, size, metadata = hashlib.sha256(), 0, None
        await self._connect()
        call = self._stub.FetchDocument(request, metadata=self._metadata)
        try:
            while True:
                try:
                    async with asyncio.timeout(FETCH_IDLE_S):
                        chunk = await call.read()
                except TimeoutError:
                    raise ClientError(
                        f"your node at {self.address} stopped answering (nothing for "
                        f"{FETCH_IDLE_S:g} s): is it hung or overloaded?", 3,
                    ) from None  # fmt: skip
                if chunk is grpc.aio.EOF:
                    break
                assert isinstance(chunk, common_pb2.DocumentChunk)
                if chunk.HasField("metadata") and metadata is None:
                    metadata = _document(chunk.metadata)
                data = chunk.data  # each read of a bytes field copies it
                digest.update(data)
                size += len(data)
                out.write(data)
                if progress is not None:
                    progress(size, metadata.size if metadata else 0)
        except grpc.aio.AioRpcError as error:
            raise self._client_error(error) from None
        finally:
            call.cancel()  # a no-op once the stream ended; else the node stops sending
        if metadata is None:
            raise ClientError("the facility sent no document metadata")
        if metadata.sha256 and digest.hexdigest() != metadata.sha256:
            raise ClientError(
                f"document {document_id}: SHA-256 mismatch ({size} bytes received); "
                "the content is not what the facility listed"
            )
        return metadata

    def _client_error(
        self, error: grpc.aio.AioRpcError, what: str = "", waited_s: float = 0.0
    ) -> ClientError:
        """The clinician's sentence and exit code for a failed call.

        ``what`` and ``waited_s`` name the call and the timeout it had, for
        the message when that timeout ran out. Text of grpc's own (an error
        no Transmural server sent) is never shown: it names grpc internals.
        """
        code, detail = error.code(), error.details() or ""
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return ClientError(f"{self.address} is not a Transmural node (no Gateway service)", 3)
        if not from_server(error):
            if code is grpc.StatusCode.DEADLINE_EXCEEDED and what:
                return ClientError(
                    f"your node at {self.address} stopped answering: the {what} did not end "
                    f"within {waited_s:g} s (the facilities' deadline, the registry's and "
                    f"{NODE_MARGIN_S:g} s more): is it hung or overloaded?", 3,
                )  # fmt: skip
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return ClientError(f"your node at {self.address} did not answer in time", 3)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                # Connected a moment ago (``_connect``): the connection broke.
                return ClientError(
                    f"cannot reach your node at {self.address}: the connection failed or "
                    "was lost (is it still running?)", 3,
                )  # fmt: skip
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            # Said by your node: the registry or a facility behind it did not answer.
            return ClientError(detail or "the network did not answer", NETWORK_UNAVAILABLE)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "concurrent" in detail.lower():
            # grpc's own limit on calls in flight: the node is busy, not broken.
            return ClientError(
                f"your node at {self.address} is busy (too many requests at once); "
                "try again in a moment", 3,
            )  # fmt: skip
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and from_server(error):
            return ClientError(detail, 3)  # our own share or limit, said in words
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            # grpc's size limits (request headers, message), not the node's words.
            return ClientError(
                "the request is too large (an identifier, token or reason far longer than "
                "any real one?)", 2,
            )  # fmt: skip
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return ClientError(detail, 2)
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return ClientError(detail, 4)
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
            return ClientError(detail, 1)
        if not from_server(error):
            return ClientError(
                f"the call to your node at {self.address} failed in gRPC itself "
                f"({code.name.lower()}), not with an answer from the node", 1,
            )  # fmt: skip
        return ClientError(f"{code.name.lower()}: {detail or 'no detail'}", 1)


def search_timeout_s(deadline_ms: int) -> float:
    """How long a search or report may take before the client gives up on the node.

    The node bounds it: a registry locate, then every facility at once under
    the deadline asked for (the node's default when 0: at most the maximum).
    """
    per_facility = deadline_ms / 1000 if deadline_ms > 0 else MAX_PEER_DEADLINE_S
    return min(per_facility, MAX_PEER_DEADLINE_S) + REGISTRY_DEADLINE_S + NODE_MARGIN_S


def _search_request(
    identifier: str, purpose: str, deadline_ms: int, reason: str
) -> gateway_pb2.SearchRequest:
    return gateway_pb2.SearchRequest(
        patient=split_token(identifier),
        purpose_of_use=purpose,
        deadline_ms=deadline_ms,
        reason=reason,
    )


def _holders(located: gateway_pb2.Located) -> Holders:
    return Holders(
        [h.node_id for h in located.holders],
        [h.organisation_name for h in located.holders],
        located.correlation_id,
        located.incomplete,
    )


def _items(r: gateway_pb2.FacilityItems) -> FacilityItems:
    return FacilityItems(
        node_id=r.facility.node_id,
        organisation=r.facility.organisation_name,
        status=STATUS_NAMES.get(r.status, "error"),
        elapsed_ms=r.elapsed_ms,
        message=r.message,
        organisation_id=r.facility.organisation_id,
        items=[_item(i) for i in r.items],
    )


def _item(i: common_pb2.ClinicalItem) -> ClinicalItem:
    return ClinicalItem(
        i.section, i.code_system, i.code, i.display, i.status, i.date,
        i.value, i.unit, i.resource_id, i.resource_json,
    )  # fmt: skip


def _document(m: common_pb2.DocumentMetadata) -> Document:
    return Document(
        m.document_id,
        m.title,
        m.type_code,
        m.type_display,
        m.content_type,
        m.size,
        m.sha256,
        m.created,
        m.author_organisation,
    )


def _result(r: gateway_pb2.FacilityResult) -> FacilityResult:
    return FacilityResult(
        node_id=r.facility.node_id,
        organisation=r.facility.organisation_name,
        status=STATUS_NAMES.get(r.status, "error"),
        elapsed_ms=r.elapsed_ms,
        message=r.message,
        documents=[_document(d) for d in r.documents],
    )
