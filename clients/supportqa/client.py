"""Python client for supportqa: blocking and asyncio flavours over the same request builders."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .v1 import supportqa_pb2 as pb
from .v1 import supportqa_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # matches the server's default limit
UPSERT_SUMMARY_KEY = "supportqa-upsert-summary-bin"
DRY_RUN_KEY = "supportqa-dry-run"  # Upsert metadata: validate every entry, write nothing
RETRIABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

AUDIO_FORMATS = {
    "": pb.AUDIO_FORMAT_UNSPECIFIED, "wav": pb.AUDIO_FORMAT_WAV, "flac": pb.AUDIO_FORMAT_FLAC,
    "ogg": pb.AUDIO_FORMAT_OGG, "opus": pb.AUDIO_FORMAT_OGG, "mp3": pb.AUDIO_FORMAT_MP3,
    "pcm16": pb.AUDIO_FORMAT_PCM16, "pcm": pb.AUDIO_FORMAT_PCM16, "raw": pb.AUDIO_FORMAT_PCM16,
    "mulaw": pb.AUDIO_FORMAT_MULAW, "ulaw": pb.AUDIO_FORMAT_MULAW, "pcmu": pb.AUDIO_FORMAT_MULAW,
    "alaw": pb.AUDIO_FORMAT_ALAW, "pcma": pb.AUDIO_FORMAT_ALAW,
}


def audio_format_of(path: str | Path) -> str:
    """The audio format a file's suffix names (a key of AUDIO_FORMATS), "" when it names none
    (the server then tells the format from the bytes)."""
    fmt = Path(path).suffix.lstrip(".").lower()
    return fmt if fmt in AUDIO_FORMATS else ""

Event = (pb.Accepted | pb.Transcript | pb.ImageText | pb.Answer | pb.NoAnswer | pb.Clarify
         | pb.NotHeard | pb.SpeechStarted | pb.Done)


class SupportQAError(Exception):
    """Any failed call: carries the gRPC status code and the server's message.

    Attributes:
        code: grpc.StatusCode of the failure.
        details: The server's message, meant for a person.
        summary: For a failed upsert, the partial UpsertSummary (what was written, what failed).
    """

    def __init__(
        self, code: grpc.StatusCode, details: str, summary: pb.UpsertSummary | None = None
    ):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.summary = summary

    @property
    def retriable(self) -> bool:
        return self.code in RETRIABLE


def _error(e: grpc.RpcError, trailing: Any = None) -> SupportQAError:
    summary = None
    for key, value in trailing or ():
        if key == UPSERT_SUMMARY_KEY:
            summary = pb.UpsertSummary.FromString(value)
    return SupportQAError(e.code(), e.details() or "", summary)


def question(
    text: str = "",
    *,
    audio: bytes | None = None,
    audio_format: str = "",
    sample_rate_hz: int = 0,
    channels: int = 0,
    image: bytes | None = None,
    image_mime: str = "",
    knowledge_base: str = "default",
    top_k: int = 5,
    min_score: float | None = None,
    locale: str = "",
    tags: Sequence[str] = (),
    language: str = "",
    metadata: dict[str, str] | None = None,
    clarify: bool = True,
) -> pb.Question:
    """Builds a Question message; see the proto for each field."""
    if audio_format.lower() not in AUDIO_FORMATS:
        raise ValueError(f"audio_format {audio_format!r} is not one of {sorted(AUDIO_FORMATS)}")
    q = pb.Question(
        knowledge_base=knowledge_base, text=text, top_k=top_k, locale=locale, tags=list(tags),
        language=language, metadata=metadata or {}, no_clarify=not clarify,
    )
    if min_score is not None:
        q.min_score = min_score
    if audio is not None:
        q.audio.CopyFrom(pb.Audio(
            data=audio, format=AUDIO_FORMATS[audio_format.lower()],
            sample_rate_hz=sample_rate_hz, channels=channels,
        ))
    if image is not None:
        q.image.CopyFrom(pb.Image(data=image, mime_type=image_mime))
    return q


def _entry(e: pb.Entry | dict) -> pb.Entry:
    if isinstance(e, pb.Entry):
        return e
    from .knowledge_file import entry_from_dict

    return entry_from_dict(e)


def feedback_request(request_id: str, helpful: bool, *, entry_id: str = "", comment: str = "",
                     knowledge_base: str = "") -> pb.FeedbackRequest:
    """Builds a FeedbackRequest; see the proto for each field."""
    return pb.FeedbackRequest(
        request_id=request_id, entry_id=entry_id, comment=comment, knowledge_base=knowledge_base,
        verdict=pb.VERDICT_HELPFUL if helpful else pb.VERDICT_NOT_HELPFUL)


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


def accepted_entry(suggestion: pb.Suggestion, existing: pb.Entry | None = None, *,
                   knowledge_base: str = "default", title: str = "", answer: str = "",
                   entry_id: str = "") -> pb.Entry:
    """The entry that applies a suggestion: ``existing`` (the suggested entry, as Get returns
    it) with the suggested questions added as paraphrases, or for a new-entry suggestion a
    new entry with ``title`` and ``answer`` (its id ``entry_id``, or made from the title).

    Raises:
        ValueError: the suggestion cannot be applied this way, or a new entry lacks its title
            or answer.
    """
    if suggestion.blocked:
        raise ValueError(suggestion.blocked)
    if suggestion.kind == pb.SUGGESTION_KIND_PARAPHRASES:
        if existing is None:
            raise ValueError(f"the suggestion adds to entry {suggestion.entry_id!r}: pass it")
        out = pb.Entry()
        out.CopyFrom(existing)
        out.knowledge_base = knowledge_base
        have = {_normal(q) for q in (out.title, *out.questions)}
        for q in suggestion.questions:
            if _normal(q) not in have:
                have.add(_normal(q))
                out.questions.append(q)
        return out
    if not (title.strip() and answer.strip()):
        raise ValueError("a new entry needs a title and an answer (supportqa accept ID "
                         "--title TEXT --answer TEXT)")
    made = "-".join("".join(c if c.isalnum() else " " for c in title.lower()).split())
    return pb.Entry(knowledge_base=knowledge_base, id=entry_id or made[:64] or suggestion.id,
                    title=title, answer=answer, questions=list(suggestion.questions))


def event_of(ev: pb.AnswerEvent) -> Event:
    """The typed message inside an AnswerEvent."""
    return getattr(ev, ev.WhichOneof("event"))


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


@dataclass(frozen=True)
class TLS:
    """How a client reaches a TLS server.

    Args:
        ca_file: PEM CA bundle that signed the server's certificate; None: the system's roots.
        cert_file: PEM client certificate, for servers that require one (mTLS).
        key_file: PEM private key of cert_file.
        server_name: The name to check the server's certificate against, when the target's
            host is not in it (an IP address, a load balancer).
    """

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both a client certificate and its key, or neither")

        def read(path):
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file), private_key=read(self.key_file),
            certificate_chain=read(self.cert_file))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _open_channel(grpc_module, target: str, max_message_bytes: int, tls: TLS | None):
    """An insecure channel, or a TLS one; grpc_module is grpc or grpc.aio."""
    options = _channel_options(max_message_bytes)
    if tls is None:
        return grpc_module.insecure_channel(target, options=options)
    return grpc_module.secure_channel(target, tls.credentials(), options=options + tls.options())


class _Base:
    def __init__(self, target: str, timeout: float, api_key: str | None, retries: int,
                 backoff: float) -> None:
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff  # seconds before the first retry; doubles, with jitter
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _delay(self, attempt: int) -> float:
        return self.backoff * (2**attempt) * (0.5 + random.random())


class SupportClient(_Base):
    """Blocking client. Every call has a deadline; only UNAVAILABLE is retried, with backoff.

    Args:
        target: "host:port" of the server.
        timeout: Default deadline per call, in seconds.
        api_key: Sent as "authorization: Bearer <key>" when the server requires one.
        retries: Extra attempts after UNAVAILABLE.
        max_message_bytes: Largest message sent or received (audio and images can be big).
        tls: Connect with TLS (and a client certificate, for mTLS); None: plaintext.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = 30.0,
                 api_key: str | None = None, retries: int = 3, backoff: float = 0.2,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: TLS | None = None) -> None:
        super().__init__(target, timeout, api_key, retries, backoff)
        self._channel = _open_channel(grpc, target, max_message_bytes, tls)
        self._answering = pb_grpc.AnsweringStub(self._channel)
        self._knowledge = pb_grpc.KnowledgeStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SupportClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None):
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() not in RETRIABLE or attempt == self.retries:
                    raise _error(e) from None
                time.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    def ask(self, text: str = "", *, timeout: float | None = None, **kwargs: Any) -> pb.AnswerSet:
        """Answers one question; keyword arguments as for `question()`."""
        return self._call(self._answering.Ask, question(text, **kwargs), timeout)

    def ask_stream(self, text: str = "", *, timeout: float | None = None,
                   **kwargs: Any) -> Iterator[Event]:
        """Yields Accepted, Transcript/ImageText, Clarify (when the best answers are too close
        to tell apart), Answer... or NoAnswer, then Done."""
        q = question(text, **kwargs)
        for attempt in range(self.retries + 1):
            started = False
            try:
                for ev in self._answering.AskStream(
                    q, timeout=timeout or self.timeout, metadata=self._metadata
                ):
                    started = True
                    yield event_of(ev)
                return
            except grpc.RpcError as e:
                if started or e.code() not in RETRIABLE or attempt == self.retries:
                    raise _error(e) from None
                time.sleep(self._delay(attempt))

    def converse(self, requests: Iterable[pb.ConverseRequest], *,
                 timeout: float | None = None) -> Iterator[Event]:
        """Streams a spoken question; see the Converse rpc."""
        try:
            for ev in self._answering.Converse(
                iter(requests), timeout=timeout or self.timeout, metadata=self._metadata
            ):
                yield event_of(ev)
        except grpc.RpcError as e:
            raise _error(e) from None

    def upsert(self, entries: Iterable[pb.Entry | dict], *, timeout: float | None = None,
               dry_run: bool = False) -> pb.UpsertSummary:
        """Writes entries (messages or dicts in the JSONL format) in one stream.

        With ``dry_run`` the server validates every entry and writes none: the summary's
        ``failures`` list each entry it would refuse (by its 0-based index).
        """
        call = self._knowledge.Upsert.with_call
        try:
            summary, _ = call(
                (_entry(e) for e in entries), timeout=timeout or self.timeout,
                metadata=self._metadata + (((DRY_RUN_KEY, "1"),) if dry_run else ()),
            )
            return summary
        except grpc.RpcError as e:
            raise _error(e, e.trailing_metadata()) from None

    def delete(self, ids: Sequence[str], *, knowledge_base: str = "default",
               timeout: float | None = None) -> pb.DeleteSummary:
        return self._call(self._knowledge.Delete,
                          pb.DeleteRequest(knowledge_base=knowledge_base, ids=list(ids)), timeout)

    def get(self, entry_id: str, *, knowledge_base: str = "default",
            timeout: float | None = None) -> pb.Entry:
        return self._call(self._knowledge.Get,
                          pb.GetRequest(knowledge_base=knowledge_base, id=entry_id), timeout)

    def list_ids(self, knowledge_base: str = "default", *,
                 timeout: float | None = None) -> list[str]:
        """The ids of a knowledge base's entries, sorted."""
        return list(self._call(self._knowledge.ListIds,
                               pb.ListIdsRequest(knowledge_base=knowledge_base), timeout).ids)

    def stats(self, knowledge_base: str = "", *, timeout: float | None = None) -> pb.StatsReply:
        return self._call(self._knowledge.Stats,
                          pb.StatsRequest(knowledge_base=knowledge_base), timeout)

    def feedback(self, request_id: str, helpful: bool, *, entry_id: str = "", comment: str = "",
                 knowledge_base: str = "", timeout: float | None = None) -> pb.FeedbackReply:
        """Says whether the answer of ``request_id`` (AnswerSet.request_id) helped;
        ``entry_id``: the entry that was right, when known."""
        return self._call(self._answering.Feedback, feedback_request(
            request_id, helpful, entry_id=entry_id, comment=comment,
            knowledge_base=knowledge_base), timeout)

    def suggest(self, knowledge_base: str = "default", *, min_questions: int = 0,
                max_suggestions: int = 0, timeout: float | None = None) -> list[pb.Suggestion]:
        """Proposals from the question log: paraphrases for entries, new entries."""
        return list(self._call(self._knowledge.Suggest, pb.SuggestRequest(
            knowledge_base=knowledge_base, min_questions=min_questions,
            max_suggestions=max_suggestions), timeout).suggestions)

    def accept(self, suggestion: pb.Suggestion, *, knowledge_base: str = "default",
               title: str = "", answer: str = "", entry_id: str = "",
               timeout: float | None = None) -> pb.UpsertSummary:
        """Applies a suggestion: Get + Upsert of its entry with the questions added, or an
        Upsert of a new entry with ``title`` and ``answer`` (accepted_entry)."""
        existing = (self.get(suggestion.entry_id, knowledge_base=knowledge_base,
                             timeout=timeout) if suggestion.entry_id else None)
        return self.upsert([accepted_entry(suggestion, existing, knowledge_base=knowledge_base,
                                           title=title, answer=answer, entry_id=entry_id)],
                           timeout=timeout)

    def lint(self, knowledge_base: str = "default", *,
             timeout: float | None = None) -> pb.LintReply:
        """Confusable entry pairs and misplaced paraphrases of a knowledge base."""
        return self._call(self._knowledge.Lint, pb.LintRequest(knowledge_base=knowledge_base),
                          timeout)

    def delete_questions(self, conversation_id: str, *, knowledge_base: str = "",
                         timeout: float | None = None) -> int:
        """Deletes the logged questions of a conversation; returns how many."""
        return self._call(self._knowledge.DeleteQuestions, pb.DeleteQuestionsRequest(
            conversation_id=conversation_id, knowledge_base=knowledge_base), timeout).deleted

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Blocks until the server's health check says SERVING."""
        wait_serving(self._channel, timeout)


def wait_serving(channel: grpc.Channel, timeout: float) -> None:
    """Polls grpc.health.v1 (via a raw method call, no extra dependency) until SERVING."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda _: b"", response_deserializer=lambda b: b,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check(None, timeout=2.0) == b"\x08\x01":  # HealthCheckResponse{status: SERVING}
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise SupportQAError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"server at health check did not report SERVING in {timeout} s")
        time.sleep(0.2)


class AsyncSupportClient(_Base):
    """asyncio client with the same methods as SupportClient, awaited."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = 30.0,
                 api_key: str | None = None, retries: int = 3, backoff: float = 0.2,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: TLS | None = None) -> None:
        super().__init__(target, timeout, api_key, retries, backoff)
        self._channel = _open_channel(grpc.aio, target, max_message_bytes, tls)
        self._answering = pb_grpc.AnsweringStub(self._channel)
        self._knowledge = pb_grpc.KnowledgeStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncSupportClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method, request, timeout: float | None):
        for attempt in range(self.retries + 1):
            try:
                return await method(
                    request, timeout=timeout or self.timeout, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRIABLE or attempt == self.retries:
                    raise _error(e) from None
                await asyncio.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    async def ask(self, text: str = "", *, timeout: float | None = None,
                  **kwargs: Any) -> pb.AnswerSet:
        return await self._call(self._answering.Ask, question(text, **kwargs), timeout)

    async def ask_stream(self, text: str = "", *, timeout: float | None = None,
                         **kwargs: Any) -> AsyncIterator[Event]:
        q = question(text, **kwargs)
        for attempt in range(self.retries + 1):
            started = False
            try:
                async for ev in self._answering.AskStream(
                    q, timeout=timeout or self.timeout, metadata=self._metadata
                ):
                    started = True
                    yield event_of(ev)
                return
            except grpc.aio.AioRpcError as e:
                if started or e.code() not in RETRIABLE or attempt == self.retries:
                    raise _error(e) from None
                await asyncio.sleep(self._delay(attempt))

    async def converse(self, requests: Iterable[pb.ConverseRequest] | AsyncIterator,
                       *, timeout: float | None = None) -> AsyncIterator[Event]:
        try:
            async for ev in self._answering.Converse(
                requests, timeout=timeout or self.timeout, metadata=self._metadata
            ):
                yield event_of(ev)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None

    async def upsert(self, entries: Iterable[pb.Entry | dict], *,
                     timeout: float | None = None, dry_run: bool = False) -> pb.UpsertSummary:
        call = self._knowledge.Upsert(
            (_entry(e) for e in entries), timeout=timeout or self.timeout,
            metadata=self._metadata + (((DRY_RUN_KEY, "1"),) if dry_run else ()),
        )
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            raise _error(e, e.trailing_metadata()) from None

    async def delete(self, ids: Sequence[str], *, knowledge_base: str = "default",
                     timeout: float | None = None) -> pb.DeleteSummary:
        return await self._call(
            self._knowledge.Delete, pb.DeleteRequest(knowledge_base=knowledge_base, ids=list(ids)),
            timeout,
        )

    async def get(self, entry_id: str, *, knowledge_base: str = "default",
                  timeout: float | None = None) -> pb.Entry:
        return await self._call(
            self._knowledge.Get, pb.GetRequest(knowledge_base=knowledge_base, id=entry_id), timeout
        )

    async def list_ids(self, knowledge_base: str = "default", *,
                       timeout: float | None = None) -> list[str]:
        """The ids of a knowledge base's entries, sorted."""
        reply = await self._call(self._knowledge.ListIds,
                                 pb.ListIdsRequest(knowledge_base=knowledge_base), timeout)
        return list(reply.ids)

    async def stats(self, knowledge_base: str = "", *,
                    timeout: float | None = None) -> pb.StatsReply:
        return await self._call(
            self._knowledge.Stats, pb.StatsRequest(knowledge_base=knowledge_base), timeout
        )


    async def feedback(self, request_id: str, helpful: bool, *, entry_id: str = "",
                       comment: str = "", knowledge_base: str = "",
                       timeout: float | None = None) -> pb.FeedbackReply:
        return await self._call(self._answering.Feedback, feedback_request(
            request_id, helpful, entry_id=entry_id, comment=comment,
            knowledge_base=knowledge_base), timeout)

    async def suggest(self, knowledge_base: str = "default", *, min_questions: int = 0,
                      max_suggestions: int = 0,
                      timeout: float | None = None) -> list[pb.Suggestion]:
        reply = await self._call(self._knowledge.Suggest, pb.SuggestRequest(
            knowledge_base=knowledge_base, min_questions=min_questions,
            max_suggestions=max_suggestions), timeout)
        return list(reply.suggestions)

    async def accept(self, suggestion: pb.Suggestion, *, knowledge_base: str = "default",
                     title: str = "", answer: str = "", entry_id: str = "",
                     timeout: float | None = None) -> pb.UpsertSummary:
        existing = (await self.get(suggestion.entry_id, knowledge_base=knowledge_base,
                                   timeout=timeout) if suggestion.entry_id else None)
        return await self.upsert(
            [accepted_entry(suggestion, existing, knowledge_base=knowledge_base, title=title,
                            answer=answer, entry_id=entry_id)], timeout=timeout)

    async def lint(self, knowledge_base: str = "default", *,
                   timeout: float | None = None) -> pb.LintReply:
        return await self._call(self._knowledge.Lint,
                                pb.LintRequest(knowledge_base=knowledge_base), timeout)

    async def delete_questions(self, conversation_id: str, *, knowledge_base: str = "",
                               timeout: float | None = None) -> int:
        reply = await self._call(self._knowledge.DeleteQuestions, pb.DeleteQuestionsRequest(
            conversation_id=conversation_id, knowledge_base=knowledge_base), timeout)
        return reply.deleted
