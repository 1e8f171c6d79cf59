"""Thin gRPC servicers over the pipeline, with the one table from domain errors to status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from supportqa.v1 import supportqa_pb2 as pb
from supportqa.v1 import supportqa_pb2_grpc as pb_grpc

from supportqa_server.answering.pipeline import Pipeline
from supportqa_server.api import converters as conv
from supportqa_server.errors import (
    Cancelled,
    DataDirInUse,
    InvalidInput,
    NotAvailable,
    NotFound,
    NotReady,
    Overloaded,
    SupportQAError,
    TooLarge,
    Unauthenticated,
    WrongModel,
)
from supportqa_server.knowledge.entries import MAX_ID_BYTES
from supportqa_server.knowledge.writer import EntryWriter, Rejected

log = logging.getLogger(__name__)

UPSERT_SUMMARY_KEY = "supportqa-upsert-summary-bin"
# Metadata "supportqa-dry-run: 1" on Upsert: validate every entry, report each refusal, write
# nothing (the CLI checks a whole file this way before writing any of it).
DRY_RUN_KEY = "supportqa-dry-run"
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
    Cancelled: grpc.StatusCode.DEADLINE_EXCEEDED,
    DataDirInUse: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(e: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a client gets for an exception."""
    for cls in type(e).__mro__:
        if cls in STATUS_OF:
            msg = str(e)
            return STATUS_OF[cls], msg if len(msg) <= MAX_DETAILS else msg[:MAX_DETAILS] + "..."
    log.exception("internal error", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); see the server log"


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


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


class AnsweringServicer(pb_grpc.AnsweringServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    @unary_errors
    async def Ask(self, request: pb.Question, context) -> pb.AnswerSet:
        req = conv.ask_request(request, _timeout(context))
        return conv.fold([ev async for ev in self.pipeline.ask(req)])

    @stream_errors
    async def AskStream(self, request: pb.Question, context) -> AsyncIterator[pb.AnswerEvent]:
        req = conv.ask_request(request, _timeout(context))
        async for ev in self.pipeline.ask(req):
            yield conv.event(ev)

    @stream_errors
    async def Converse(self, request_iterator, context) -> AsyncIterator[pb.AnswerEvent]:
        messages = (conv.converse_message(m) async for m in request_iterator)
        async for ev in self.pipeline.converse(messages, _timeout(context)):
            yield conv.event(ev)


class KnowledgeServicer(pb_grpc.KnowledgeServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def Upsert(self, request_iterator, context) -> pb.UpsertSummary:
        md = dict(context.invocation_metadata() or ())
        writer = EntryWriter(self.pipeline, dry_run=md.get(DRY_RUN_KEY, "") in ("1", "true"))
        current_id = ""
        try:
            async for msg in request_iterator:
                current_id = msg.id
                kb, entry = conv.entry_data(msg)
                await writer.add(kb, entry, conv.entry_images(msg))
            await writer.flush()
            return conv.upsert_summary(writer.report)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001
            code, msg = status_of(e)
            if isinstance(e, InvalidInput | TooLarge):
                try:
                    await writer.flush()  # entries before the bad one stay written
                except Exception as e2:  # noqa: BLE001
                    code, msg = status_of(e2)
                writer.report.rejected.append(Rejected(
                    writer.report.received - 1, current_id[:MAX_ID_BYTES], msg, code.name))
            summary = conv.upsert_summary(writer.report)
            await context.abort(
                code, msg, trailing_metadata=((UPSERT_SUMMARY_KEY, summary.SerializeToString()),)
            )

    @unary_errors
    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteSummary:
        deleted, missing = await self.pipeline.delete(
            request.knowledge_base or "default", list(request.ids)
        )
        return pb.DeleteSummary(deleted=deleted, not_found=missing)

    @unary_errors
    async def Get(self, request: pb.GetRequest, context) -> pb.Entry:
        kb = request.knowledge_base or "default"
        return conv.entry_message(kb, self.pipeline.get(kb, request.id))

    @unary_errors
    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsReply:
        out = pb.StatsReply()
        for name, entries, rows, image_rows, threshold, head in self.pipeline.stats(
            request.knowledge_base
        ):
            out.knowledge_bases.append(pb.KnowledgeBaseStats(
                name=name, entries=entries, rows=rows, image_rows=image_rows,
                threshold=threshold, head=head,
            ))
        for c in self.pipeline.components:
            out.components.append(
                pb.Component(name=c.name, model=c.model, device=c.device, enabled=c.enabled,
                             detail=c.detail)
            )
        return out


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer KEY` on supportqa services when keys are configured."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = {f"Bearer {k}" for k in keys}

        async def deny(request, context):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong API key: send metadata 'authorization: Bearer <key>'",
            )

        self._deny = deny

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith("/supportqa."):
            return await continuation(handler_call_details)
        md = dict(handler_call_details.invocation_metadata or ())
        if md.get("authorization") in self._keys:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self._deny_stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(self._deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(self._deny_stream)
        return grpc.unary_unary_rpc_method_handler(self._deny)

    async def _deny_stream(self, request, context):
        await self._deny(request, context)
        yield  # pragma: no cover - abort raises first
