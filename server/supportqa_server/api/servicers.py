"""Thin gRPC servicers over the pipeline: requests converted, keys' knowledge bases checked,
events observed; domain errors become statuses through api/status.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from supportqa.v1 import supportqa_pb2 as pb
from supportqa.v1 import supportqa_pb2_grpc as pb_grpc

from supportqa_server.answering import traffic
from supportqa_server.answering.pipeline import Pipeline
from supportqa_server.answering.types import ConverseStart
from supportqa_server.api import auth, observe
from supportqa_server.api import converters as conv
from supportqa_server.api.status import status_of, stream_errors, unary_errors
from supportqa_server.errors import InvalidInput, PermissionDenied, TooLarge
from supportqa_server.knowledge.entries import MAX_ID_BYTES
from supportqa_server.knowledge.writer import EntryWriter, Rejected
from supportqa_server.learning import LintOptions
from supportqa_server.runtime.settings import DEFAULT_KB

UPSERT_SUMMARY_KEY = "supportqa-upsert-summary-bin"
# Metadata "supportqa-dry-run: 1" on Upsert: validate every entry, report each refusal, write
# nothing (the CLI checks a whole file this way before writing any of it).
DRY_RUN_KEY = "supportqa-dry-run"


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


async def _observed(events, trip: traffic.Trip | None = None, pipeline=None):
    """The events, seen by the request log and the question's trip; at each Done the trip
    goes to the question log (never waiting, never failing the answer), and the next turn of
    a whole-call Converse starts a fresh one."""
    log = getattr(pipeline, "traffic", None)
    async for ev in events:
        observe.saw(ev)
        if trip is not None:
            trip.saw(ev)
            if trip.done:
                if log is not None:
                    log.record(trip)
                trip.next_turn()
        yield ev


class AnsweringServicer(pb_grpc.AnsweringServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def _events(self, request: pb.Question, context):
        req = conv.ask_request(request, _timeout(context))
        observe.asked(req)
        auth.current().require(req.knowledge_base)
        trip = traffic.begin(req.knowledge_base, req.text, conv.conversation_id(request))
        return _observed(self.pipeline.ask(req), trip, self.pipeline)

    @unary_errors
    async def Ask(self, request: pb.Question, context) -> pb.AnswerSet:
        return conv.fold([ev async for ev in self._events(request, context)])

    @stream_errors
    async def AskStream(self, request: pb.Question, context) -> AsyncIterator[pb.AnswerEvent]:
        async for ev in self._events(request, context):
            yield conv.event(ev)

    @stream_errors
    async def Converse(self, request_iterator, context) -> AsyncIterator[pb.AnswerEvent]:
        trip = traffic.begin()

        async def messages():
            async for m in request_iterator:
                msg = conv.converse_message(m)
                if isinstance(msg, ConverseStart):
                    observe.asked(msg.request, voice=True)
                    auth.current().require(msg.request.knowledge_base)
                    trip.knowledge_base = msg.request.knowledge_base
                    trip.conversation_id = conv.conversation_id(m.config.question)
                yield msg

        async for ev in _observed(self.pipeline.converse(messages(), _timeout(context)), trip,
                                  self.pipeline):
            yield conv.event(ev)

    @unary_errors
    async def Feedback(self, request: pb.FeedbackRequest, context) -> pb.FeedbackReply:
        fb = conv.feedback(request)
        principal = auth.current()
        if fb.knowledge_base:
            observe.touched(fb.knowledge_base)
            principal.require(fb.knowledge_base)
        q = await self.pipeline.question_log().feedback(fb, principal.can_see)
        observe.touched(q.knowledge_base)
        return pb.FeedbackReply(knowledge_base=q.knowledge_base, outcome=q.outcome)


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
                observe.touched(kb)
                auth.current().require(kb, auth.WRITER)
                await writer.add(kb, entry, conv.entry_images(msg))
            await writer.flush()
            return conv.upsert_summary(writer.report)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001
            code, msg = status_of(e)
            if isinstance(e, InvalidInput | TooLarge | PermissionDenied):
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
        kb = request.knowledge_base or DEFAULT_KB
        observe.touched(kb)
        auth.current().require(kb, auth.WRITER)
        deleted, missing = await self.pipeline.delete(kb, list(request.ids))
        return pb.DeleteSummary(deleted=deleted, not_found=missing)

    @unary_errors
    async def Get(self, request: pb.GetRequest, context) -> pb.Entry:
        kb = request.knowledge_base or DEFAULT_KB
        observe.touched(kb)
        auth.current().require(kb)
        return conv.entry_message(kb, self.pipeline.get(kb, request.id))

    @unary_errors
    async def ListIds(self, request: pb.ListIdsRequest, context) -> pb.ListIdsReply:
        kb = request.knowledge_base or DEFAULT_KB
        observe.touched(kb)
        auth.current().require(kb)
        return pb.ListIdsReply(ids=self.pipeline.ids(kb))

    @unary_errors
    async def Suggest(self, request: pb.SuggestRequest, context) -> pb.SuggestReply:
        kb = request.knowledge_base or DEFAULT_KB
        observe.touched(kb)
        auth.current().require(kb, auth.WRITER)
        found = await self.pipeline.question_log().suggest(kb, conv.suggest_options(request))
        return pb.SuggestReply(suggestions=[conv.suggestion(s) for s in found])

    @unary_errors
    async def Lint(self, request: pb.LintRequest, context) -> pb.LintReply:
        kb = request.knowledge_base or DEFAULT_KB
        observe.touched(kb)
        auth.current().require(kb, auth.WRITER)
        return conv.lint_reply(await self.pipeline.lint(kb, LintOptions()))

    @unary_errors
    async def DeleteQuestions(self, request: pb.DeleteQuestionsRequest,
                              context) -> pb.DeleteQuestionsReply:
        observe.touched(request.knowledge_base)
        auth.current().require(request.knowledge_base or DEFAULT_KB, auth.ADMIN)
        deleted = await self.pipeline.question_log().forget(request.conversation_id,
                                                            request.knowledge_base)
        return pb.DeleteQuestionsReply(deleted=deleted)

    @unary_errors
    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsReply:
        out = pb.StatsReply()
        principal = auth.current()
        if request.knowledge_base:
            observe.touched(request.knowledge_base)
            principal.require(request.knowledge_base)
        for name, entries, rows, image_rows, threshold, head, source in self.pipeline.stats(
            request.knowledge_base
        ):
            if not principal.can_see(name):
                continue
            out.knowledge_bases.append(pb.KnowledgeBaseStats(
                name=name, entries=entries, rows=rows, image_rows=image_rows,
                threshold=threshold, head=head, threshold_source=source,
            ))
        for c in self.pipeline.components:
            out.components.append(
                pb.Component(name=c.name, model=c.model, device=c.device, enabled=c.enabled,
                             detail=c.detail)
            )
        return out
