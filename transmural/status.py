"""The one boundary between domain errors and gRPC statuses.

Every servicer method is wrapped in ``maps_errors``: a ``TransmuralError``
becomes its gRPC status with its (patient-free) message; anything else is
logged here and leaves as INTERNAL with no exception text, so no stack
trace or patient data ever crosses the wire.

A request whose bytes do not parse as its protobuf message never reaches a
servicer: ``MalformedRequestInterceptor`` (every server has it, see
``transport.new_server``) answers INVALID_ARGUMENT without the parser's
text, where grpc itself would answer UNKNOWN and quote the exception.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from transmural.errors import TransmuralError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def grpc_code(error: TransmuralError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.grpc_code, grpc.StatusCode.INTERNAL)


#: Trailing metadata key on every error a Transmural server sends. A client
#: seeing it knows the server itself answered (so UNAVAILABLE means something
#: behind it is down); without it, the client could not reach the server.
ERROR_ORIGIN_KEY = "transmural-error"
#: Longest error message sent: it travels in a header, and a message quoting a
#: huge input would exceed the header limit and reach the client as noise.
MAX_DETAIL_CHARS = 1000


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, TransmuralError):
        # The message may quote what the caller sent (e.g. an invalid BSN):
        # only the kind of refusal is logged above DEBUG.
        log.info("refused %s: %s", method, type(exc).__name__)
        log.debug("refused %s: %s", method, exc)
        context.set_trailing_metadata(((ERROR_ORIGIN_KEY, type(exc).__name__),))
        await context.abort(grpc_code(exc), _shortened(str(exc)))
    log.error("unexpected error in %s", method, exc_info=exc)
    context.set_trailing_metadata(((ERROR_ORIGIN_KEY, "internal"),))
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _shortened(detail: str) -> str:
    """``detail``, cut to MAX_DETAIL_CHARS with a mark where it was cut."""
    if len(detail) <= MAX_DETAIL_CHARS:
        return detail
    return detail[: MAX_DETAIL_CHARS - 20] + " ... (message cut)"


def from_server(error: grpc.aio.AioRpcError) -> bool:
    """True when a Transmural server produced this error (see ERROR_ORIGIN_KEY)."""
    metadata = error.trailing_metadata() or ()
    return any(key == ERROR_ORIGIN_KEY for key, _ in metadata)


def maps_errors(method: F) -> F:
    """Wrap a unary or server-streaming servicer method (see module doc)."""
    name = method.__qualname__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, name)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, name)

    return unary  # type: ignore[return-value]


#: What the client is told when its request does not parse.
MALFORMED_REQUEST = "the request could not be parsed as its protobuf message"


class _Malformed:
    """Stands in for a request whose bytes did not parse."""


_MALFORMED = _Malformed()


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Turn an unparsable unary request into INVALID_ARGUMENT (see module doc).

    The handler's deserializer is wrapped so a ``DecodeError`` yields a
    marker instead of escaping into grpc; the behaviour is wrapped to abort
    on that marker before the servicer runs. Streaming-request handlers are
    left as they are (no service here takes a request stream of its own).
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = handler_call_details.method

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError:
                return _MALFORMED

        if handler.response_streaming:
            return handler._replace(
                request_deserializer=lenient,
                unary_stream=_guard(handler.unary_stream, method),
            )
        return handler._replace(
            request_deserializer=lenient, unary_unary=_guard(handler.unary_unary, method)
        )


async def _refuse_malformed(context: grpc.aio.ServicerContext, method: str) -> None:
    log.info("refused %s: the request did not parse", method)
    context.set_trailing_metadata(((ERROR_ORIGIN_KEY, "InvalidInput"),))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_REQUEST)


def _guard(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    """``behaviour`` of the same kind (coroutine or async generator), refusing the marker."""
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if request is _MALFORMED:
                await _refuse_malformed(context, method)
            async for item in behaviour(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is _MALFORMED:
            await _refuse_malformed(context, method)
        return await behaviour(request, context)

    return unary
