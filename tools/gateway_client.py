"""The clinician's side of the Gateway service, as plain Python.

Used by the ``transmural`` command and by the demo; returns dataclasses
and raises ``ClientError`` with a message fit for a terminal. ``search``
and ``report`` stream the same way: first ``Holders`` (whom the registry
listed), then one answer per facility as it arrives.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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

#: Longest a search may take end to end: the node bounds each facility's
#: answer (at most 30 s), so this only fires when the node itself hangs.
SEARCH_TIMEOUT_S = 45.0


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
        tls = None if access.ca_pem is None else transport.TlsFiles(access.ca_pem)
        server_name = pki.node_dns_name(access.node_id) if access.node_id else "localhost"
        self._channel = transport.open_channel(access.address, tls, server_name)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._metadata = (("authorization", f"Bearer {access.token}"),)

    async def close(self) -> None:
        await self._channel.close()

    async def check(self) -> None:
        """Ask the standard gRPC health service whether the Gateway serves here.

        It proves the address answers, its certificate comes from the given
        CA and names the given node id (TLS), and the port is a Transmural
        gateway. It sends no token and touches no patient: the token is
        only checked by the first search or report, which is audited.
        """
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
        try:
            async for event in self._stub.Search(
                request, timeout=SEARCH_TIMEOUT_S, metadata=self._metadata
            ):
                if event.HasField("located"):
                    yield _holders(event.located)
                else:
                    yield _result(event.result)
        except grpc.aio.AioRpcError as error:
            raise self._client_error(error) from None

    async def report(
        self,
        identifier: str,
        purpose: str = "treatment",
        deadline_ms: int = 0,
        reason: str = "",
    ) -> AsyncIterator[Holders | FacilityItems]:
        """The live report's fan-out: like ``search``, with structured entries per facility."""
        request = _search_request(identifier, purpose, deadline_ms, reason)
        try:
            async for event in self._stub.Report(
                request, timeout=SEARCH_TIMEOUT_S, metadata=self._metadata
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
            raise self._client_error(error) from None

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
        the size the facility listed (0 if it listed none).
        """
        request = gateway_pb2.GatewayFetchRequest(
            patient=split_token(identifier),
            node_id=node_id,
            document_id=document_id,
            purpose_of_use=purpose,
            reason=reason,
        )
        digest, size, metadata = hashlib.sha256(), 0, None
        try:
            async for chunk in self._stub.FetchDocument(request, metadata=self._metadata):
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
        if metadata is None:
            raise ClientError("the facility sent no document metadata")
        if metadata.sha256 and digest.hexdigest() != metadata.sha256:
            raise ClientError(
                f"document {document_id}: SHA-256 mismatch ({size} bytes received); "
                "the content is not what the facility listed"
            )
        return metadata

    def _client_error(self, error: grpc.aio.AioRpcError) -> ClientError:
        code, detail = error.code(), error.details() or ""
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return ClientError(f"{self.address} is not a Transmural node (no Gateway service)", 3)
        if not from_server(error):
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return ClientError(f"your node at {self.address} did not answer in time", 3)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                return ClientError(
                    f"cannot reach your node at {self.address}: is it running, and are the "
                    "network CA and node id right?", 3,
                )  # fmt: skip
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "concurrent" in detail.lower():
            # grpc's own limit on calls in flight: the node is busy, not broken.
            return ClientError(
                f"your node at {self.address} is busy (too many requests at once); "
                "try again in a moment", 3,
            )  # fmt: skip
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and from_server(error):
            return ClientError(detail, 3)  # our own share or limit, said in words
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return ClientError(detail, 2)
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return ClientError(detail, 4)
        if code in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAVAILABLE,
        ):
            return ClientError(detail, 1)
        return ClientError(f"{code.name.lower()}: {detail or 'no detail'}", 1)


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
