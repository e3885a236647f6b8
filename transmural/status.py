"""The one boundary between domain errors and gRPC statuses.

Every servicer method is wrapped in ``maps_errors``: a ``TransmuralError``
becomes its gRPC status with its (patient-free) message; anything else is
logged here and leaves as INTERNAL with no exception text, so no stack
trace or patient data ever crosses the wire.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from transmural.errors import TransmuralError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def grpc_code(error: TransmuralError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.grpc_code, grpc.StatusCode.INTERNAL)


#: Trailing metadata key on every error a Transmural server sends. A client
#: seeing it knows the server itself answered (so UNAVAILABLE means something
#: behind it is down); without it, the client could not reach the server.
ERROR_ORIGIN_KEY = "transmural-error"


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, TransmuralError):
        # The message may quote what the caller sent (e.g. an invalid BSN):
        # only the kind of refusal is logged above DEBUG.
        log.info("refused %s: %s", method, type(exc).__name__)
        log.debug("refused %s: %s", method, exc)
        context.set_trailing_metadata(((ERROR_ORIGIN_KEY, type(exc).__name__),))
        await context.abort(grpc_code(exc), str(exc))
    log.error("unexpected error in %s", method, exc_info=exc)
    context.set_trailing_metadata(((ERROR_ORIGIN_KEY, "internal"),))
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


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
