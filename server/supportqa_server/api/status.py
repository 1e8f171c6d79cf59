"""The one table from domain errors to gRPC status codes, and the decorators that apply it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import grpc

from supportqa_server.api import auth
from supportqa_server.errors import (
    Cancelled,
    DataDirInUse,
    InvalidInput,
    NotAvailable,
    NotFound,
    NotReady,
    Overloaded,
    PermissionDenied,
    SupportQAError,
    TooLarge,
    Unauthenticated,
    UnknownKnowledgeBase,
    WrongModel,
)

log = logging.getLogger(__name__)

# Characters of a status message: gRPC fails a call whose metadata (the message and the
# Upsert summary travel there) passes 16 KiB, and the client then sees RESOURCE_EXHAUSTED.
MAX_DETAILS = 2000

STATUS_OF: dict[type[SupportQAError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    TooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotAvailable: grpc.StatusCode.UNIMPLEMENTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    WrongModel: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Cancelled: grpc.StatusCode.DEADLINE_EXCEEDED,
    DataDirInUse: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(e: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a client gets for an exception."""
    for cls in type(e).__mro__:
        if cls in STATUS_OF:
            # An unknown knowledge base's message lists only those the caller may see.
            msg = (e.message(auth.current().can_see) if isinstance(e, UnknownKnowledgeBase)
                   else str(e))
            return STATUS_OF[cls], msg if len(msg) <= MAX_DETAILS else msg[:MAX_DETAILS] + "..."
    log.exception("internal error", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); see the server log"


def unary_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await fn(self, request, context)
        except (grpc.aio.AbortError, AssertionError):
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status, never crashes the server
            code, msg = status_of(e)
            await context.abort(code, msg)

    return wrapper


def stream_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001
            code, msg = status_of(e)
            await context.abort(code, msg)

    return wrapper
