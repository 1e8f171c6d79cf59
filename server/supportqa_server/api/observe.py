"""Every call, seen once: its key checked, then counted in the metrics and written as one
request-log line (question texts masked, keys never)."""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from supportqa_server.answering.types import (
    Accepted,
    Answer,
    AskRequest,
    Done,
    NoAnswer,
    NotHeard,
    Transcript,
)
from supportqa_server.api import auth
from supportqa_server.api.metrics import UNKNOWN_KB, Metrics
from supportqa_server.api.status import status_of
from supportqa_server.errors import PermissionDenied, SupportQAError
from supportqa_server.runtime.logs import mask

request_log = logging.getLogger("supportqa.requests")


@dataclass
class Call:
    """What one call did, filled in by the servicers as its events pass."""

    method: str  # "Ask", "Upsert", ...
    request_id: str = ""
    knowledge_base: str = ""
    modality: str = ""  # text | voice | image
    outcome: str = ""  # answered | no_answer (questions)
    top_score: float | None = None
    timings_us: dict[str, int] = field(default_factory=dict)
    question: str = ""
    transcript: str = ""


_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar("supportqa_call", default=None)


def asked(req: AskRequest, *, voice: bool = False) -> None:
    """Records a question's knowledge base, modality and text on the current call."""
    call = _call.get()
    if call is None:
        return
    call.knowledge_base = req.knowledge_base
    call.modality = ("voice" if voice or req.audio is not None
                     else "image" if req.image is not None else "text")
    call.question = req.text


def touched(kb: str) -> None:
    """Records the knowledge base a call that asks nothing works on."""
    call = _call.get()
    if call is not None:
        call.knowledge_base = kb


def saw(ev) -> None:
    """Records what an answering event says about the current call."""
    call = _call.get()
    if call is None:
        return
    if isinstance(ev, Accepted):
        call.request_id = ev.request_id
    elif isinstance(ev, Transcript) and ev.final:
        call.transcript = ev.text
    elif isinstance(ev, Answer):
        if ev.rank == 1:
            call.outcome, call.top_score = "answered", ev.score
    elif isinstance(ev, NoAnswer):
        call.outcome, call.top_score = "no_answer", ev.best_score
    elif isinstance(ev, NotHeard):
        call.outcome = "not_heard"
    elif isinstance(ev, Done):
        call.timings_us = dataclasses.asdict(ev.timings)


_GRPC_TYPE = {(False, False): "unary", (False, True): "server_stream",
              (True, False): "client_stream", (True, True): "bidi_stream"}


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Checks each supportqa call's key and role, then counts and logs it.

    Args:
        metrics: Where the counts go.
        keys: The KeyRing; None or one without keys lets every caller in as an admin.
        known_kb: Whether a knowledge base exists (metric labels name only those).
        log_questions: "masked", "raw" or "off".
        tracing: Add a span per stage under the RPC's span (api/tracing.py).
    """

    def __init__(self, metrics: Metrics, keys: auth.KeyRing | None,
                 known_kb: Callable[[str], bool], log_questions: str = "masked",
                 tracing: bool = False) -> None:
        self.metrics, self.keys, self.known_kb = metrics, keys, known_kb
        self.log_questions, self.tracing = log_questions, tracing

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        kind = (handler.request_streaming, handler.response_streaming)
        _, service, method = details.method.split("/")
        labels = (_GRPC_TYPE[kind], service, method)
        md = dict(details.invocation_metadata or ())
        ours = details.method in auth.ROLE_OF
        if kind[1]:
            inner = handler.unary_stream or handler.stream_stream

            async def behaviour(request, context):
                async with _Watch(self, details.method, labels, md, context, ours) as w:
                    w.authenticate()
                    async for item in inner(request, context):
                        yield item
        else:
            inner = handler.unary_unary or handler.stream_unary

            async def behaviour(request, context):
                async with _Watch(self, details.method, labels, md, context, ours) as w:
                    w.authenticate()
                    return await inner(request, context)

        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[kind]
        return make(behaviour, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class _Watch:
    """The span of one call: authenticates on entry, counts and logs on exit."""

    def __init__(self, owner: ObservingInterceptor, full_method: str, labels: tuple, md: dict,
                 context, ours: bool) -> None:
        self.owner, self.full_method, self.labels, self.md = owner, full_method, labels, md
        self.context, self.ours = context, ours
        self.call = Call(labels[2])
        self.principal = auth.ANONYMOUS

    async def __aenter__(self) -> _Watch:
        self.t0, self.wall0 = time.perf_counter(), time.time()
        self.owner.metrics.started.labels(*self.labels).inc()
        self._call_token = _call.set(self.call)
        self._principal_token = None
        return self

    def authenticate(self) -> None:
        """Raises Unauthenticated or PermissionDenied unless the caller's key may call this
        method; sets the call's principal for the servicers' knowledge-base checks."""
        keys = self.owner.keys
        if not self.ours or keys is None or not keys.enabled:
            return
        self.principal = keys.authenticate(self.md.get("authorization"))
        role = auth.ROLE_OF[self.full_method]
        if auth.RANK[self.principal.role] < auth.RANK[role]:
            raise PermissionDenied(f"key {self.principal.name!r} is a {self.principal.role} "
                                   f"key; {self.labels[2]} needs a {role} key")
        self._principal_token = auth.set_current(self.principal)

    async def __aexit__(self, exc_type, exc, tb) -> None:
        code, msg = self._code(exc), ""
        if isinstance(exc, SupportQAError):  # refused before the servicer ran
            code, msg = status_of(exc)
        seconds = time.perf_counter() - self.t0
        m = self.owner.metrics
        m.handled.labels(*self.labels, code.name).inc()
        m.handling.labels(*self.labels).observe(seconds)
        if self.ours:
            self._record(code, seconds)
        if self._principal_token is not None:
            auth.reset_current(self._principal_token)
        _call.reset(self._call_token)
        if msg:
            await self.context.abort(code, msg)

    def _code(self, exc) -> grpc.StatusCode:
        import asyncio

        if exc is None or isinstance(exc, grpc.aio.AbortError):
            return self.context.code() or grpc.StatusCode.OK
        if isinstance(exc, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        return grpc.StatusCode.UNKNOWN

    def _record(self, code: grpc.StatusCode, seconds: float) -> None:
        call, m = self.call, self.owner.metrics
        kb = call.knowledge_base
        question = call.method in ("Ask", "AskStream", "Converse")
        if question:
            outcome = call.outcome if code == grpc.StatusCode.OK and call.outcome else "error"
            label = kb if kb and self.owner.known_kb(kb) else UNKNOWN_KB
            modality = call.modality or "text"
            m.questions.labels(label, modality, outcome).inc()
            if call.top_score is not None:
                m.confidence.labels(modality).observe(call.top_score)
            for stage, us in call.timings_us.items():
                if us:
                    m.stage.labels(stage.removesuffix("_us"), modality).observe(us / 1e6)
        else:
            outcome = "ok" if code == grpc.StatusCode.OK else "error"
        doc = {
            "request_id": call.request_id or uuid.uuid4().hex,
            "method": call.method,
            "knowledge_base": kb,
            "modality": call.modality,
            "outcome": outcome,
            "top_score": None if call.top_score is None else round(call.top_score, 4),
            "timings_ms": {k.removesuffix("_us"): round(v / 1000, 2)
                           for k, v in call.timings_us.items() if v},
            "duration_ms": round(seconds * 1000, 2),
            "code": code.name,
            "caller": {"peer": self.context.peer(), "key": self.principal.name,
                       "user_agent": self.md.get("user-agent", "")},
        }
        policy = self.owner.log_questions
        if policy != "off":
            shown = (lambda t: t) if policy == "raw" else mask
            if call.question:
                doc["question"] = shown(call.question)
            if call.transcript:
                doc["transcript"] = shown(call.transcript)
        if self.owner.tracing and doc["timings_ms"]:
            from supportqa_server.api.tracing import stage_spans

            stage_spans(doc["timings_ms"], self.wall0)
        score = "" if call.top_score is None else f" top={call.top_score:.3f}"
        request_log.info("%s kb=%s %s %s%s %s %.1f ms", call.method, kb or "-",
                         call.modality or "-", outcome, score, code.name, seconds * 1000,
                         extra={"request": doc})
