"""Who is calling: the one interceptor that reads the peer's certificate.

On a mutual-TLS port grpc has already checked the client certificate's
chain and validity during the handshake. This interceptor adds what grpc
cannot: it refuses revoked certificates (grpc's Python credentials take no
revocation list) and makes the caller's identity available to the
servicer through ``current_caller()``. Servicers never take a caller's
identity from a request field.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from transmural import pki

log = logging.getLogger(__name__)

NODE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
#: Methods any TLS client may call without a certificate check here.
UNCHECKED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified certificate of the node on the other end of this call."""

    identity: pki.CertificateIdentity
    public_key: ec.EllipticCurvePublicKey


_CALLER: ContextVar[Caller | None] = ContextVar("transmural_caller", default=None)


def current_caller() -> Caller | None:
    """The calling node, inside a call on a mutual-TLS port; None elsewhere."""
    return _CALLER.get()


@functools.lru_cache(maxsize=256)
def _parse(pem: bytes) -> Caller:
    cert = x509.load_pem_x509_certificate(pem)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return Caller(pki.identity(cert), key)


def caller_from_context(context: grpc.aio.ServicerContext) -> Caller | None:
    values = context.auth_context().get("x509_pem_cert")
    return _parse(values[0]) if values else None


def is_node_certificate(identity: pki.CertificateIdentity) -> bool:
    """A facility node's certificate: a node id and an organisation id.

    The registry's own certificate (CN registry.transmural, no organisation)
    is from the same CA but must never act as a node.
    """
    return bool(
        identity.organisation_id
        and identity.node_id
        and identity.node_id != pki.REGISTRY_DNS_NAME
        and NODE_ID.fullmatch(identity.node_id)
    )


class CertificateInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without a certificate or with a revoked one; expose the caller."""

    def __init__(self, is_revoked: Callable[[pki.CertificateIdentity], bool]) -> None:
        self._is_revoked = is_revoked
        self._warned: set[str] = set()  # revoked callers already logged at WARNING

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(UNCHECKED_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming methods in our protocol

    async def _admit(self, context: grpc.aio.ServicerContext, method: str) -> Caller:
        caller = caller_from_context(context)
        if caller is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        assert caller is not None
        if not is_node_certificate(caller.identity):
            log.warning("refused %s: certificate %r is not a facility node's", method,
                        caller.identity.node_id)  # fmt: skip
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "only facility nodes may call this service (the certificate names no node "
                "and organisation)",
            )
        if caller.identity.not_after <= datetime.now(UTC):
            # TLS checked validity when the connection opened; it may have
            # outlived the certificate since.
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the certificate of node {caller.identity.node_id} has expired",
            )
        if self._is_revoked(caller.identity):
            node_id = caller.identity.node_id
            level = logging.DEBUG if node_id in self._warned else logging.WARNING
            self._warned.add(node_id)
            log.log(level, "refused %s: certificate of %s is revoked", method, node_id)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the certificate of node {caller.identity.node_id} has been revoked",
            )
        return caller

    def _unary(self, behaviour: Any, method: str) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = _CALLER.set(await self._admit(context, method))
            try:
                return await behaviour(request, context)
            finally:
                _reset(token)

        return call

    def _stream(self, behaviour: Any, method: str) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            token = _CALLER.set(await self._admit(context, method))
            try:
                async for item in behaviour(request, context):
                    yield item
            finally:
                _reset(token)

        return call


def _reset(token: Token[Caller | None]) -> None:
    """Undo ``_CALLER.set``; a stream closed from another context just drops it."""
    with contextlib.suppress(ValueError):
        _CALLER.reset(token)
