"""A question's trip: decode, transcribe / read / embed, search, rank, answer. No gRPC."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from supportqa_server.answering import converse as converse_flow
from supportqa_server.answering import traffic
from supportqa_server.answering.knowledge_bases import KnowledgeBases
from supportqa_server.answering.models import IMAGE, OCR, SPEECH, TEXT, Models
from supportqa_server.answering.rank import (
    READ,
    SEE,
    RankedEntry,
    RankOptions,
    best_sentence,
    fuse_lists,
    rank,
)
from supportqa_server.answering.search import (
    MIN_ROWS,
    SearchItem,
    question_batch,
    row_limits,
    us_since,
)
from supportqa_server.answering.types import (  # noqa: F401 - the answering API, re-exported
    DEFAULT_TOP_K,
    MAX_TOP_K,
    Accepted,
    Answer,
    AskRequest,
    AudioInput,
    Clarify,
    Component,
    ConverseMessage,
    ConverseStart,
    Done,
    EndOfUtterance,
    Event,
    ImageInput,
    ImageText,
    NoAnswer,
    NotHeard,
    SpeechStarted,
    Timings,
    Transcript,
    UpsertResult,
)
from supportqa_server.errors import InvalidInput, NotAvailable, NotReady, TooLarge
from supportqa_server.knowledge.entries import MAX_FILTER_TAGS, EntryData
from supportqa_server.knowledge.questions import QuestionLog
from supportqa_server.knowledge.store import KnowledgeStore
from supportqa_server.knowledge.writer import Splitting, check_kb_name, with_passages
from supportqa_server.learning import LintOptions, LintReport, lint
from supportqa_server.learning.vectors import rows_of
from supportqa_server.runtime.datadir import lock_data_dir
from supportqa_server.runtime.settings import Settings

log = logging.getLogger(__name__)

# Rows lint reads at most: it scores every paraphrase against every row (20,000 rows: 15 s on
# a store thread, 2 cores; docs/benchmarks/learning.md).
LINT_MAX_ROWS = 20_000

CLARIFY_OPTIONS = 3  # entries a Clarify offers at most: more is too many to read out


@dataclass(frozen=True)
class _Query:
    """One text to search, and the routes that produced it."""

    text: str
    routes: tuple[str, ...] = ()
    weight: float = 1.0  # share in the fusion of the question's lists
    heard: bool = False  # a transcript: ranked with SUPPORTQA_HEAD_WEIGHT_VOICE


@dataclass
class Pipeline:
    """Answers questions and writes entries over the models, the store and the knowledge
    bases' derived state; every public method is async."""

    settings: Settings
    rank_options: RankOptions | None = None  # None: from settings

    def __post_init__(self) -> None:
        if self.rank_options is None:
            self.rank_options = RankOptions.from_settings(self.settings)
        self.heard_rank_options = replace(
            self.rank_options, head_weight=self.settings.head_weight_voice
        )
        self.ready = False
        self.store: KnowledgeStore | None = None
        self.models = Models(self.settings)
        self.store_exec = ThreadPoolExecutor(
            self.settings.store_threads, thread_name_prefix="store"
        )
        self.kbs = KnowledgeBases(
            self.settings, model_exec=self.models.model_exec, store_exec=self.store_exec,
            head_on=max(self.rank_options.head_weight, self.heard_rank_options.head_weight,
                        self.rank_options.head_confidence) > 0,
            rank_options=self.rank_options,
        )
        self.buffered_audio = 0  # bytes all open Converse streams hold, against a budget
        self._lock = None  # the open lock file of the data folder (Milvus Lite)
        self.store_ok = True  # Milvus answers (a server's outage turns it False)
        # Awaited with store_ok whenever it changes (the app turns health to match).
        self.on_store_health: Callable[[bool], Awaitable[None]] | None = None
        self._watcher: asyncio.Task | None = None
        self.traffic: traffic.Traffic | None = None  # the question log's writer, when on

    @property
    def components(self) -> list[Component]:
        return self.models.components

    # Start-up and shutdown

    def load(self) -> None:
        """Loads the models and opens the store (blocking; call it on the model thread)."""
        s, models = self.settings, self.models
        models.load()
        uri = s.milvus_uri
        if not uri:
            s.data_dir.mkdir(parents=True, exist_ok=True)
            self._lock = lock_data_dir(s.data_dir)
            uri = str((s.data_dir / "milvus.db").resolve())
        self.store = KnowledgeStore(
            uri, models.encoder.dim, token=s.milvus_token, db_name=s.milvus_db,
            lexical=s.lexical,
            image_dim=models.image_encoder.dim if models.image_encoder else 0,
            # Replaced rows outlive a few polls, so no replica loses an entry meanwhile.
            delete_delay_s=4 * s.store_poll_seconds + 1,
        )
        self.store.open()
        self.kbs.store, self.kbs.speech = self.store, models.speech
        if s.question_log and s.log_questions != "off":
            questions = QuestionLog(self.store.client, models.encoder.dim, uri=uri,
                                    days=s.question_log_days, max_rows=s.question_log_max_rows)
            self.traffic = traffic.Traffic(s, questions, self.store, self.store_exec,
                                           models.write_vectors)
        self.kbs.encode = models.encode_batch
        models.components.append(Component(
            "store", uri, "", detail=f"milvus {self.store.server_version}; routes: "
            + ", ".join(self.store.routes)))

    async def start(self) -> None:
        """Loads everything off the event loop, then starts the batchers."""
        await asyncio.get_running_loop().run_in_executor(self.models.model_exec, self.load)
        self.models.start(
            functools.partial(question_batch, self.store, self.models.encode_batch),
            self.kbs.speech_lm,
        )
        self.ready = True
        if self.traffic is not None:
            self.traffic.start()
        for kb in self.store.knowledge_bases():
            self.kbs.head(kb)
        if self.store.shared:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_store())

    async def _watch_store(self) -> None:
        """On a Milvus server, every SUPPORTQA_STORE_POLL_SECONDS: catch up with the other
        replicas' writes (their knowledge bases' heads and speech models follow the
        revision), and notice Milvus going away and coming back (collections re-loaded)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.store_poll_seconds)
            try:
                if not self.store_ok:
                    await loop.run_in_executor(self.store_exec, self.store.reconnect)
                changed = await loop.run_in_executor(self.store_exec, self.store.refresh)
            except Exception as e:  # noqa: BLE001 - an outage; the next turn tries again
                if self.store_ok:
                    log.warning("knowledge store unreachable, NOT_SERVING until it is back: %s",
                                str(e).splitlines()[0][:300])
                    await self._store_health(False)
                continue
            if not self.store_ok:
                log.info("knowledge store back: SERVING")
                await self._store_health(True)
            for kb in changed:
                self.kbs.head(kb)  # retrain on the other replica's entries

    async def _store_health(self, ok: bool) -> None:
        self.store_ok = ok
        if self.on_store_health is not None:
            await self.on_store_health(ok)

    async def close(self) -> None:
        self.ready = False
        if self._watcher is not None:
            self._watcher.cancel()
        self.kbs.cancel()
        if self.traffic is not None:  # masked questions still need the text encoder
            await self.traffic.close()
        await self.models.close()
        # Store-thread jobs still running (a write, a head's read of the rows) end before the
        # store closes: a read on a closed store fails, and a write must not be cut short.
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.store_exec.shutdown, wait=True, cancel_futures=True))
        if self.store is not None:
            self.store.close()
        if self._lock is not None:
            self._lock.close()  # releases the data folder's lock
            self._lock = None
        self.models.shutdown()

    def _require_ready(self) -> KnowledgeStore:
        if not self.ready or self.store is None:
            raise NotReady("the server is still loading its models; retry in a few seconds")
        return self.store

    # Validation

    def check(self, req: AskRequest, *, audio_expected: bool = False) -> AskRequest:
        """Validates a question; raises InvalidInput/TooLarge/NotFound with what to fix."""
        store = self._require_ready()
        check_kb_name(req.knowledge_base)
        text = req.text.strip()
        if not text and req.audio is None and req.image is None and not audio_expected:
            raise InvalidInput("the question is empty: set text, audio or image")
        if len(req.text) > self.settings.max_text_chars:
            raise TooLarge(
                f"question text is {len(req.text)} characters; the limit is "
                f"{self.settings.max_text_chars}: send the question, not the whole conversation"
            )
        if not 1 <= req.top_k <= MAX_TOP_K:
            raise InvalidInput(f"top_k is {req.top_k}; it must be between 1 and {MAX_TOP_K}")
        if req.min_score is not None and not 0.0 <= req.min_score <= 1.0:
            raise InvalidInput(f"min_score is {req.min_score}; it must be within [0, 1]")
        if len(req.tags) > MAX_FILTER_TAGS:
            raise InvalidInput(
                f"the question filters on {len(req.tags)} tags; the limit is {MAX_FILTER_TAGS}: "
                "filter on fewer tags"
            )
        if (req.audio is not None or audio_expected) and self.models.speech is None:
            raise NotAvailable(
                "voice questions are off on this server: it runs with no speech model "
                "(SUPPORTQA_SPEECH_MODEL)"
            )
        m = self.models
        if req.image is not None and m.reader is None and m.image_encoder is None:
            raise NotAvailable(
                "image questions are off on this server: enable OCR (SUPPORTQA_OCR) or "
                "configure CLIP (SUPPORTQA_CLIP_MODEL)"
            )
        if not store.has(req.knowledge_base):
            store.counts(req.knowledge_base)  # raises NotFound naming the existing ones
        return req

    # Answering

    async def ask(self, req: AskRequest) -> AsyncIterator[Event]:
        """Answers one question as a stream of events (see the module's event classes)."""
        t_start = time.perf_counter()
        req = self.check(req)
        timings = Timings()
        yield Accepted(uuid.uuid4().hex)
        utterance = None
        if req.audio is not None:
            utterance = await self._decode_audio(req.audio, timings)
        async for ev in self.answer_accepted(req, utterance, timings, t_start):
            yield ev

    async def _decode_audio(self, audio: AudioInput, timings: Timings) -> np.ndarray:
        from supportqa_server.speech.audio import decode_audio

        t0 = time.perf_counter()
        utterance = await asyncio.get_running_loop().run_in_executor(
            self.models.decode_exec,
            lambda: decode_audio(audio.data, audio.format, audio.sample_rate_hz, audio.channels,
                                 max_seconds=self.settings.max_audio_seconds),
        )
        timings.decode_us += us_since(t0)
        return utterance

    async def answer_accepted(
        self, req: AskRequest, utterance: np.ndarray | None, timings: Timings, t_start: float
    ) -> AsyncIterator[Event]:
        """Everything after acceptance: transcribe / read / see, search, rank, answer."""
        queries: list[_Query] = []
        see_vector = None
        if utterance is not None:
            t0 = time.perf_counter()
            heard = await self.models.submit(
                SPEECH, (utterance, req.language, req.knowledge_base), req.timeout
            )
            timings.transcribe_us += us_since(t0)
            conf = heard.confidence
            yield Transcript(heard.text, heard.language, True, 0.0 if conf != conf else conf)
            doubt = heard.doubt(self.settings.speech_min_confidence)
            if doubt and not req.text.strip() and req.image is None:
                yield NotHeard(f"please repeat: {doubt}", 0.0 if conf != conf else conf)
                timings.total_us = us_since(t_start)
                yield Done(timings)
                return
            if heard.text.strip():
                queries.append(_Query(heard.text.strip(), heard=True))
                queries += [_Query(text, weight=p, heard=True) for text, p in
                            heard.alternatives[: self.settings.speech_nbest - 1]
                            if p >= self.settings.speech_nbest_min]
        if req.image is not None:
            from supportqa_server.vision.images import load_image

            t0 = time.perf_counter()
            s = self.settings
            image = await asyncio.get_running_loop().run_in_executor(
                self.models.decode_exec,
                lambda: load_image(req.image.data, req.image.mime_type,
                                   max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels,
                                   max_decode_bytes=s.max_image_decode_bytes),
            )
            timings.decode_us += us_since(t0)
            if self.models.reader is not None:
                from supportqa_server.vision.ocr import joined_text, question_text

                t0 = time.perf_counter()
                lines = await self.models.submit(OCR, image, req.timeout)
                timings.read_us += us_since(t0)
                yield ImageText(tuple((ln.text, float(ln.confidence)) for ln in lines))
                # The question's block leads; all the text read (titles, error codes in
                # headers) joins at half weight. Image eval: docs/benchmarks/quality.md.
                read, every = question_text(lines), joined_text(lines)
                if read.strip():
                    queries.append(_Query(read[: s.max_text_chars], (READ,)))
                if every.strip() and every != read:
                    queries.append(_Query(every[: s.max_text_chars], (READ,), 0.5))
            if self.models.image_encoder is not None:
                t0 = time.perf_counter()
                see_vector = await self.models.submit(IMAGE, image, req.timeout)
                timings.embed_us += us_since(t0)
        if req.text.strip():
            queries.append(_Query(req.text.strip()))
        threshold = (
            req.min_score if req.min_score is not None
            else self.kbs.threshold(req.knowledge_base)
        )
        if not queries and see_vector is None:
            what = "speech in the audio" if utterance is not None else "readable text in the image"
            yield NoAnswer(f"no confident answer: found no {what}", 0.0, threshold)
            timings.total_us = us_since(t_start)
            yield Done(timings)
            return
        lists = await asyncio.gather(*(self._ranked(req, q, timings) for q in queries))
        if req.min_score is None:  # the head may have become current while ranking
            threshold = self.kbs.threshold(req.knowledge_base)
        weighted = [(q.weight, r) for q, r in zip(queries, lists, strict=True)]
        if see_vector is not None:
            weighted.append((1.0, await self._ranked_see(req, see_vector, timings)))
        t0 = time.perf_counter()
        ranked = weighted[0][1] if len(weighted) == 1 else fuse_lists(weighted)
        events = self._answers(req, ranked, threshold, queries[0].text if queries else "")
        timings.rank_us += us_since(t0)
        for ev in events:
            yield ev
        timings.total_us = us_since(t_start)
        yield Done(timings)

    async def _ranked(self, req: AskRequest, q: _Query, timings: Timings) -> list[RankedEntry]:
        opts = self.heard_rank_options if q.heard else self.rank_options
        # The head orders (head_weight) and joins the confidence (head_confidence).
        head = (self.kbs.head(req.knowledge_base)
                if opts.head_weight > 0 or opts.head_confidence > 0 else None)
        limit, lexical_limit = row_limits(
            req.top_k, head is not None and opts.head_weight > 0,
            self.rank_options.lexical_weight > 0 and self.store is not None and self.store.lexical)
        t0 = time.perf_counter()
        found = await self.models.submit(TEXT, SearchItem(
            req.knowledge_base, q.text, limit, lexical_limit, req.locale, req.tags, head
        ), req.timeout)
        traffic.searched(q.text, q.weight, found.vector)
        timings.embed_us += us_since(t0) - found.search_us - found.head_us
        timings.search_us += found.search_us
        t0 = time.perf_counter()
        ranked = rank(found.dense, found.lexical, opts, extra_routes=q.routes, head=found.head)
        timings.rank_us += us_since(t0) + found.head_us
        return ranked

    async def _ranked_see(
        self, req: AskRequest, vector: np.ndarray, timings: Timings
    ) -> list[RankedEntry]:
        assert self.store is not None
        t0 = time.perf_counter()
        (hits,) = await asyncio.get_running_loop().run_in_executor(
            self.store_exec,
            lambda: self.store.search_images(req.knowledge_base, vector[None, :], limit=MIN_ROWS),
        )
        timings.search_us += us_since(t0)
        best: dict[str, RankedEntry] = {}
        for h in hits:
            if h.entry_id not in best:
                # CLIP cosines of matching pairs sit near 0.3; map them onto [0, 1] so the
                # threshold means the same across routes (see docs/benchmarks/quality.md).
                score = max(0.0, min(1.0, h.score))
                best[h.entry_id] = RankedEntry(h.entry_id, score, score, {SEE}, h.text)
        return sorted(best.values(), key=lambda r: -r.fused)

    def _answers(
        self, req: AskRequest, ranked: list[RankedEntry], threshold: float, question: str = ""
    ) -> list[Answer | NoAnswer]:
        assert self.store is not None
        out: list[Answer | NoAnswer] = []
        best: RankedEntry | None = None  # the best guess: the first entry still stored
        for r in ranked:
            if len(out) >= req.top_k:
                break
            confident = r.score >= threshold
            if out and not confident:
                continue  # later answers must be confident too
            entry = self.store.entry(req.knowledge_base, r.entry_id)
            if entry is None:  # deleted since the search
                continue
            if not confident:
                # The best guess is not confident: say so, rather than answer with an entry
                # ranked below it. On CLINC150 val at 0.44 that answered 6 more out-of-scope
                # questions, and in-scope ones wrongly instead of not at all
                # (docs/benchmarks/quality.md).
                best = r
                break
            passage = entry.passage_of(r.matched_text) or (
                entry.passages[0] if entry.passages else None)
            out.append(Answer(
                len(out) + 1, entry, r.score, tuple(sorted(r.routes)), r.matched_text, passage,
                best_sentence(question, passage.text) if passage else "",
            ))
        if req.clarify and len(out) >= 2:
            close = [a for a in out if abs(a.score - out[0].score) < self.settings.clarify_margin]
            if len(close) >= 2:
                close = close[:CLARIFY_OPTIONS]
                out.insert(0, Clarify(
                    f"{len(close)} entries within {self.settings.clarify_margin:.2f} of each "
                    "other", tuple((a.entry.id, a.entry.title, a.score) for a in close)))
        if not out:
            reason = (
                f"no confident answer: the best match scores {best.score:.2f}, below the "
                f"threshold {threshold:.2f}" if best else "no confident answer: nothing matched"
            )
            out.append(NoAnswer(reason, best.score if best else 0.0, threshold))
        return out

    def converse(self, messages: AsyncIterator[ConverseMessage], timeout: float | None
                 ) -> AsyncIterator[Event]:
        """Answers a question spoken as a stream of audio chunks (converse.py)."""
        return converse_flow.converse(self, messages, timeout)

    # Knowledge

    async def upsert(
        self,
        knowledge_base: str,
        entries: Sequence[EntryData],
        images: Sequence[Sequence[ImageInput]] | None = None,
    ) -> UpsertResult:
        """Embeds and writes validated entries of one knowledge base (knowledge/writer.py
        validates them).

        images[i] are the pictures of entries[i]; with CLIP configured they and the entry's
        texts are embedded into the See route's space, otherwise they are only counted.
        """
        store = self._require_ready()
        texts = [[t for _, t in e.texts()] for e in entries]
        with self.kbs.writing(knowledge_base):
            per_entry = await self.models.write_vectors(texts)
            see = None
            if self.models.image_encoder is not None:
                entries, see = await self.models.see_vectors(entries, texts, images)
            replaced, rows = await asyncio.get_running_loop().run_in_executor(
                self.store_exec, store.upsert, knowledge_base, entries, per_entry, see
            )
        self.kbs.head(knowledge_base)  # retrain now rather than on the next question
        return UpsertResult(len(entries), replaced, rows)

    async def with_passages(self, index: int, entry: EntryData) -> EntryData:
        """The entry with an article body or a long answer split into passages
        (knowledge/writer.py), on a worker thread: a large article takes a second."""
        if entry.passages or (
                not entry.body and len(entry.answer) < self.settings.passage_tokens):
            return entry  # split already; or a word piece has a character at least: it fits
        s = self.settings
        splitting = Splitting(self.models.encoder.count_tokens, s.passage_tokens,
                              s.max_article_bytes)
        return await asyncio.get_running_loop().run_in_executor(
            self.models.decode_exec, with_passages, index, entry, splitting)

    async def delete(self, knowledge_base: str, ids: Sequence[str]) -> tuple[int, list[str]]:
        store = self._require_ready()
        deleted = await asyncio.get_running_loop().run_in_executor(
            self.store_exec, store.delete, knowledge_base, list(ids)
        )
        self.kbs.head(knowledge_base)
        return deleted

    # Learning (the question log; learning/)

    def question_log(self) -> traffic.Traffic:
        """The question log's calls; raises NotAvailable when it is off."""
        self._require_ready()
        if self.traffic is None:
            raise NotAvailable(
                "the question log is off on this server (SUPPORTQA_QUESTION_LOG=off or "
                "SUPPORTQA_LOG_QUESTIONS=off): it keeps no questions to give feedback on, "
                "forget or learn from")
        return self.traffic

    async def lint(self, knowledge_base: str, options: LintOptions) -> LintReport:
        """A knowledge base's confusable entries and misplaced paraphrases (learning/lint.py),
        on a store thread: it reads every row."""
        store = self._require_ready()
        options.check()
        store.counts(knowledge_base)  # NotFound naming the knowledge bases there are

        def run() -> LintReport:
            return lint(rows_of(store, knowledge_base, LINT_MAX_ROWS)[0], options)

        return await asyncio.get_running_loop().run_in_executor(self.store_exec, run)

    def get(self, knowledge_base: str, entry_id: str) -> EntryData:
        return self._require_ready().get(knowledge_base, entry_id)

    def ids(self, knowledge_base: str) -> list[str]:
        """The ids of a knowledge base's entries, sorted."""
        return self._require_ready().ids(knowledge_base)

    def entry(self, knowledge_base: str, entry_id: str) -> EntryData | None:
        """The stored entry, or None (also for an unknown knowledge base)."""
        return self._require_ready().entry(knowledge_base, entry_id)

    def stats(self, knowledge_base: str = "") -> list[tuple[str, int, int, int, float, str, str]]:
        """(name, entries, rows, image rows, threshold, entry head state, how the threshold
        was set) per knowledge base."""
        store = self._require_ready()
        names = [knowledge_base] if knowledge_base else store.knowledge_bases()
        return [(n, *store.counts(n), self.kbs.threshold(n), self.kbs.head_state(n),
                 self.kbs.threshold_source(n))
                for n in names]
