"""A question's trip: decode, transcribe / read / embed, search, rank, answer. No gRPC."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from supportqa_server.answering import converse as converse_flow
from supportqa_server.answering.head import EntryHead
from supportqa_server.answering.heads import HeadKeeper
from supportqa_server.answering.rank import READ, SEE, RankedEntry, RankOptions, fuse_lists, rank
from supportqa_server.answering.types import (  # noqa: F401 - the answering API, re-exported
    DEFAULT_TOP_K,
    MAX_TOP_K,
    Accepted,
    Answer,
    AskRequest,
    AudioInput,
    Component,
    ConverseMessage,
    ConverseStart,
    Done,
    EndOfUtterance,
    Event,
    ImageInput,
    ImageText,
    NoAnswer,
    Timings,
    Transcript,
    UpsertResult,
)
from supportqa_server.errors import (
    InvalidInput,
    NotAvailable,
    NotReady,
    TooLarge,
)
from supportqa_server.knowledge.store import (
    MAX_FILTER_TAGS,
    EntryData,
    KnowledgeStore,
    RowHit,
    short_id,
    unfit,
)
from supportqa_server.runtime.batching import MicroBatcher
from supportqa_server.runtime.datadir import lock_data_dir
from supportqa_server.runtime.settings import KB_NAME_PATTERN, Settings

log = logging.getLogger(__name__)

# Dense rows fetched per question: at least MIN_ROWS, and ROWS_PER_ANSWER per requested answer
# (an entry owns several rows), so aggregation sees the leaders' best paraphrases.
ROWS_PER_ANSWER = 40
MIN_ROWS = 200
# Half that when the entry head ranks too: offline it scores as 200 rows do (BANKING77 dev 0.9349
# both, ~106 rows an entry; CLINC150 in-scope 0.947 at NA recall 0.77 both), for 0.18 ms less
# search and half the ranking a question, 1.16x the QPS at c=32 (docs/benchmarks/tuning.md).
# Without the head (voice), 100 rows cost CLINC150 0.004 accuracy@1.
ROWS_PER_ANSWER_HEAD = 20
MIN_ROWS_HEAD = 100
# BM25 rows per question: fusion only needs the leaders' best BM25 row. Same dev scores as 200
# (BANKING77 0.919, CLINC150 0.915 @ NA recall 0.70) at a quarter of the rows to read and
# check against the committed versions (docs/benchmarks/README.md).
LEXICAL_ROWS = 50
# Questions per encoder forward pass within one batch, on CPU, by precision: length-sorted
# chunks pad less than one pass over the batch. 2 cores, BANKING77 questions, batch of 64:
# float32 355/s at 16 (216/s at 64); bfloat16 712/s at 32, 700/s at 16, 645/s at 64.
ENCODE_CHUNK = {"float32": 16, "bfloat16": 32}
LM_REBUILD_S = 10.0  # speech LM of a changing knowledge base: rebuilt at most this often
MAX_QUESTIONS = 200  # paraphrases per entry
WRITE_ENCODE_TEXTS = 32  # texts of a write embedded per model-thread job (one encode chunk)
_KB_RE = re.compile(KB_NAME_PATTERN)


@dataclass(frozen=True)
class _SearchItem:
    """One question for the text encoder batch: embedded, then searched on both routes."""

    knowledge_base: str
    text: str
    limit: int  # dense rows
    lexical_limit: int  # BM25 rows; 0: no BM25
    locale: str
    tags: tuple[str, ...]
    head: EntryHead | None = None  # scored in the batch's job when the vector fits it


@dataclass(frozen=True)
class _Found:
    vector: np.ndarray
    dense: list[RowHit]
    lexical: list[RowHit]
    search_us: int  # of the batch's job, for StageTimings
    head: dict[str, float] | None = None  # the entry head's probabilities, when asked
    head_us: int = 0  # the batch's head scoring: ranking work, for StageTimings.rank_us


@dataclass(frozen=True)
class _Query:
    """One text to search, and the routes that produced it."""

    text: str
    routes: tuple[str, ...] = ()
    weight: float = 1.0  # share in the fusion of the question's lists
    heard: bool = False  # a transcript: ranked with SUPPORTQA_HEAD_WEIGHT_VOICE


def _dtype_name(dtype) -> str:
    """"bfloat16" for torch.bfloat16 (the pipeline keeps torch out of its imports)."""
    return str(dtype).removeprefix("torch.")


def _us(t0: float) -> int:
    return int((time.perf_counter() - t0) * 1e6)


def _split(rows: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Consecutive slices of rows, counts[i] rows each."""
    out, start = [], 0
    for n in counts:
        out.append(rows[start : start + n])
        start += n
    return out


@dataclass
class Pipeline:
    """Owns the models, their batchers and the store; every public method is async."""

    settings: Settings
    rank_options: RankOptions | None = None  # None: from settings

    def __post_init__(self) -> None:
        if self.rank_options is None:
            self.rank_options = RankOptions.from_settings(self.settings)
        self._heard_rank_options = replace(
            self.rank_options, head_weight=self.settings.head_weight_voice
        )
        self.ready = False
        self.store: KnowledgeStore | None = None
        self.encoder = None
        self.speech = None  # SpeechRecognizer when voice is on
        self.reader = None  # TextReader when OCR is on
        self.image_encoder = None  # ImageEncoder when CLIP is configured
        self.device = "cpu"
        self.components: list[Component] = []
        # The torch models (text encoder, Whisper, CLIP) share one thread. torch's OpenMP
        # (libgomp) gives each calling thread its own team, and once more OpenMP threads
        # exist than cores it stops spin-waiting between parallel regions: on 2 cores a
        # second torch thread made one MiniLM sentence take 13.6 ms instead of 5.9 and a
        # Whisper clip 311 ms instead of 169, in every thread (docs/benchmarks/tuning.md). The
        # batchers run one batch at a time there, so the models need no locks. OCR
        # (onnxruntime, its own pool) keeps a thread of its own.
        self._model_exec = ThreadPoolExecutor(1, thread_name_prefix="models")
        self._ocr_exec = ThreadPoolExecutor(1, thread_name_prefix="ocr")
        self._decode_exec = ThreadPoolExecutor(2, thread_name_prefix="decode")
        self._store_exec = ThreadPoolExecutor(
            self.settings.store_threads, thread_name_prefix="store"
        )
        self._batchers: dict[str, MicroBatcher] = {}
        # knowledge base -> (store revision, built at (monotonic s), its speech LM)
        self._speech_lms: dict[str, tuple] = {}
        self.heads = HeadKeeper(
            self.settings, model_exec=self._model_exec, store_exec=self._store_exec,
            on=self.rank_options.head_weight > 0 or self._heard_rank_options.head_weight > 0,
        )
        self._buffered_audio = 0  # bytes all open Converse streams hold, against a budget
        self._lock = None  # the open lock file of the data folder (Milvus Lite)

    # Start-up and shutdown

    def load(self) -> None:
        """Loads models and opens the store (blocking; call from a thread)."""
        from supportqa_server.runtime.devices import configure_threads, resolve_device
        from supportqa_server.runtime.encoder import TextEncoder

        s = self.settings
        configure_threads(s.torch_threads)
        self.device = resolve_device(s.device)
        t0 = time.perf_counter()
        self.encoder = TextEncoder(s.text_model, self.device, s.precision, s.cache_dir)
        log.info("text encoder %s on %s in %.1f s", self.encoder.model_name, self.device,
                 time.perf_counter() - t0)
        self.components.append(Component(
            "text_encoder", self.encoder.model_name, self.device,
            detail=_dtype_name(self.encoder.dtype),
        ))
        self._load_speech()
        self._load_ocr()
        self._load_clip()
        uri = s.milvus_uri
        if not uri:
            s.data_dir.mkdir(parents=True, exist_ok=True)
            self._lock = lock_data_dir(s.data_dir)
            uri = str((s.data_dir / "milvus.db").resolve())
        self.store = KnowledgeStore(
            uri, self.encoder.dim, token=s.milvus_token, db_name=s.milvus_db, lexical=s.lexical,
            image_dim=self.image_encoder.dim if self.image_encoder else 0,
        )
        self.store.open()
        self.heads.store = self.store
        self.components.append(Component("store", uri, "", detail="milvus"))

    def _load_speech(self) -> None:
        s = self.settings
        if not s.speech_model:
            self.components.append(Component(
                "speech", enabled=False, detail="off: set SUPPORTQA_SPEECH_MODEL to tiny.en or base"
            ))
            return
        from supportqa_server.speech.transcribe import SpeechRecognizer

        t0 = time.perf_counter()
        self.speech = SpeechRecognizer(
            s.speech_model, self.device, cache_dir=s.cache_dir, trim_audio=s.speech_trim,
            beam_size=s.speech_beam_size or None, lm_weight=s.speech_lm_weight,
            precision=s.precision,
        )
        log.info("speech %s in %.1f s", s.speech_model, time.perf_counter() - t0)
        self.components.append(Component(
            "speech", s.speech_model, self.device,
            detail=_dtype_name(self.speech.dtype),
        ))

    def _load_ocr(self) -> None:
        if not self.settings.ocr:
            self.components.append(Component("ocr", enabled=False, detail="off: SUPPORTQA_OCR"))
            return
        from supportqa_server.vision.ocr import TextReader

        self.reader = TextReader()
        self.components.append(Component("ocr", "rapidocr PP-OCR (bundled)", "cpu"))

    def _load_clip(self) -> None:
        s = self.settings
        if not s.clip_model:
            self.components.append(Component(
                "image_encoder", enabled=False,
                detail="off: the See route needs SUPPORTQA_CLIP_MODEL (a CLIP path or hub id)",
            ))
            return
        from supportqa_server.vision.clip_model import ImageEncoder

        self.image_encoder = ImageEncoder(s.clip_model, self.device, s.precision)
        self.components.append(Component(
            "image_encoder", self.image_encoder.model_name, self.device,
            detail=f"{self.image_encoder.dim}-d",
        ))

    async def start(self) -> None:
        """Loads everything off the event loop, then starts the batchers."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._model_exec, self.load)
        s = self.settings

        def batcher(name: str, fn, executor, max_batch: int, max_wait_ms: float,
                    max_queue_ms: float = s.max_queue_ms) -> None:
            self._batchers[name] = MicroBatcher(
                fn, executor=executor, max_batch=max_batch, max_wait_ms=max_wait_ms,
                max_queue=s.max_queue, max_queue_ms=max_queue_ms, name=name,
            )

        # A question's search runs in its encoder batch's job, on the model thread: on 2 cores
        # a search beside the next encode made both slower (12 questions: encode 29-32 -> 51
        # ms, search ~8 -> 31 ms), so in turns more gets done (docs/benchmarks/tuning.md).
        batcher("text encoder", self._question_batch, self._model_exec, s.max_batch,
                s.max_wait_ms)
        if self.speech is not None:
            batcher("speech", self._transcribe_batch, self._model_exec,
                    s.speech_max_batch, s.speech_max_wait_ms, s.speech_max_queue_ms)
        if self.reader is not None:
            batcher("ocr", self._read_batch, self._ocr_exec, s.ocr_max_batch, 0.0,
                    s.speech_max_queue_ms)
        if self.image_encoder is not None:
            batcher("image encoder", self._embed_image_batch, self._model_exec, s.max_batch,
                    s.max_wait_ms)
        self.ready = True
        for kb in self.store.knowledge_bases():
            self._head(kb)

    async def close(self) -> None:
        self.ready = False
        self.heads.cancel()
        for name, b in self._batchers.items():
            await b.close()
            st = b.stats
            if st.batches:  # what max_batch / max_wait tuning needs to know
                log.info("%s: %d items in %d batches (mean %.1f, largest %d); %d dropped, "
                         "%d refused; ran %.1f s, items queued %.1f ms on average", name,
                         st.items, st.batches, st.items / st.batches, max(st.sizes), st.dropped,
                         st.rejected, st.busy_s, 1000 * st.waited_s / st.items)
        # Store-thread jobs still running (a write, a head's read of the rows) end before the
        # store closes: a read on a closed store fails, and a write must not be cut short.
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self._store_exec.shutdown, wait=True, cancel_futures=True))
        if self.store is not None:
            self.store.close()
        if self._lock is not None:
            self._lock.close()  # releases the data folder's lock
            self._lock = None
        for ex in (self._model_exec, self._ocr_exec, self._decode_exec):
            ex.shutdown(wait=False)

    def _require_ready(self) -> KnowledgeStore:
        if not self.ready or self.store is None:
            raise NotReady("the server is still loading its models; retry in a few seconds")
        return self.store

    # Model calls, run on their executors by the batchers

    def _encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        assert self.encoder is not None
        # A GPU takes the whole batch in one pass.
        chunk = (
            ENCODE_CHUNK.get(_dtype_name(self.encoder.dtype), 16)
            if self.device == "cpu" else max(1, len(texts))
        )
        return list(self.encoder.encode_sorted(texts, batch_size=chunk))

    def _transcribe_batch(self, items: list[tuple[np.ndarray, str, str]]) -> list:
        assert self.speech is not None
        out: list = [None] * len(items)
        by_language: dict[str, list[int]] = {}
        for i, (_, language, _) in enumerate(items):
            by_language.setdefault(language, []).append(i)
        for language, idx in by_language.items():
            try:
                found = self.speech.transcribe_batch(
                    [items[i][0] for i in idx], language or None,
                    [self._speech_lm(items[i][2]) for i in idx],
                )
            except Exception as e:  # noqa: BLE001 - one language group's failure is its own
                found = [e] * len(idx)
            for i, r in zip(idx, found, strict=True):
                out[i] = r
        return out

    def _speech_lm(self, kb: str):
        """The knowledge base's language model for Whisper's decoding, None when off.

        Runs on the model thread only. Built on a KB's first voice question (~1 s per 10k
        texts) and rebuilt after writes, at most once per LM_REBUILD_S: a model a few writes
        behind still knows the domain's words.
        """
        assert self.speech is not None and self.store is not None
        if self.speech.lm_weight <= 0 or not self.store.has(kb):
            return None
        cached = self._speech_lms.get(kb)
        now = time.monotonic()
        if cached is not None and (
            cached[0] == self.store.revision(kb) or now - cached[1] < LM_REBUILD_S
        ):
            return cached[2]
        t0 = time.perf_counter()
        revision, texts = self.store.texts(kb)
        lm = self.speech.knowledge_lm(texts)
        self._speech_lms[kb] = (revision, now, lm)
        log.info("speech language model for %r: %d texts in %.2f s", kb, lm.n_texts,
                 time.perf_counter() - t0)
        return lm

    # The entry head (heads.py)

    def _head(self, kb: str):
        return self.heads.head(kb)

    def head_state(self, kb: str) -> str:
        """"ready" (trained on the current entries), "training" or "off"."""
        return self.heads.state(kb)

    def _read_batch(self, images: list) -> list:
        assert self.reader is not None
        return self.reader.read_batch(images)

    def _embed_image_batch(self, images: list) -> list[np.ndarray]:
        assert self.image_encoder is not None
        return list(self.image_encoder.embed_images(images))

    def _question_batch(self, items: list[_SearchItem]) -> list:
        """Embeds a batch, searches it, and scores it with the items' entry heads: per item a
        _Found, or the exception of its search group (knowledge base, limits, filters: one
        Milvus call per route each)."""
        assert self.store is not None
        vectors = self._encode_batch([it.text for it in items])
        t0 = time.perf_counter()
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            key = (it.knowledge_base, it.limit, it.lexical_limit, it.locale, it.tags)
            groups.setdefault(key, []).append(i)
        out: list = [None] * len(items)
        for (kb, limit, lexical_limit, locale, tags), idx in groups.items():
            try:
                found = self.store.search(
                    kb, np.stack([vectors[i] for i in idx]), [items[i].text for i in idx],
                    limit=limit, locale=locale, tags=tags, lexical=lexical_limit > 0,
                    lexical_limit=lexical_limit or None,
                )
            except Exception as e:  # noqa: BLE001 - one group's failure is its callers' alone
                found = [e] * len(idx)
            for i, r in zip(idx, found, strict=True):
                out[i] = r
        search_us = _us(t0)
        t0 = time.perf_counter()
        probs = self._head_batch(items, vectors)
        head_us = _us(t0)
        return [r if isinstance(r, Exception) else _Found(v, r[0], r[1], search_us, h, head_us)
                for v, r, h in zip(vectors, out, probs, strict=True)]

    @staticmethod
    def _head_batch(items: list[_SearchItem], vectors: list[np.ndarray]) -> list:
        """Per item, its entry head's probabilities (None without a head that fits): one
        product per head for the batch.

        Run in the encoder batch's job on the model thread, not per question on the event
        loop: there its Python (the question's words) cost 6-12% of QPS at concurrency 32,
        likely by holding the GIL the model thread needs between the encoder's ops
        (docs/benchmarks/tuning.md). The product is numpy's: on one thread, as the CLI sets
        OpenBLAS (cli.NUMPY_BLAS_THREADS).
        """
        probs: list[dict[str, float] | None] = [None] * len(items)
        by_head: dict[int, list[int]] = {}  # id(): EntryHead holds arrays, so is not hashable
        for i, it in enumerate(items):
            if it.head is not None and it.head.dim == len(vectors[i]):
                by_head.setdefault(id(it.head), []).append(i)
        for idx in by_head.values():
            found = items[idx[0]].head.probabilities(
                np.stack([vectors[i] for i in idx]), [items[i].text for i in idx])
            for i, p in zip(idx, found, strict=True):
                probs[i] = p
        return probs

    async def _submit(self, name: str, item, timeout: float | None):
        result = await self._batchers[name].submit(item, timeout=timeout)
        if isinstance(result, Exception):
            raise result
        return result

    # Validation

    def check(self, req: AskRequest, *, audio_expected: bool = False) -> AskRequest:
        """Validates a question; raises InvalidInput/TooLarge/NotFound with what to fix."""
        store = self._require_ready()
        if not _KB_RE.match(req.knowledge_base):
            raise InvalidInput(
                f"knowledge base name {req.knowledge_base!r} is invalid: use 1-64 of A-Z a-z 0-9 _"
            )
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
        if (req.audio is not None or audio_expected) and self.speech is None:
            raise NotAvailable(
                "voice questions are off on this server: it runs with no speech model "
                "(SUPPORTQA_SPEECH_MODEL)"
            )
        if req.image is not None and self.reader is None and self.image_encoder is None:
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
        clip = None
        if req.audio is not None:
            clip = await self._decode_audio(req.audio, timings)
        async for ev in self._answer(req, clip, timings, t_start):
            yield ev

    async def _decode_audio(self, audio: AudioInput, timings: Timings) -> np.ndarray:
        from supportqa_server.speech.audio import decode_audio

        t0 = time.perf_counter()
        clip = await asyncio.get_running_loop().run_in_executor(
            self._decode_exec,
            lambda: decode_audio(audio.data, audio.format, audio.sample_rate_hz, audio.channels,
                                 max_seconds=self.settings.max_audio_seconds),
        )
        timings.decode_us += _us(t0)
        return clip

    async def _answer(
        self, req: AskRequest, clip: np.ndarray | None, timings: Timings, t_start: float
    ) -> AsyncIterator[Event]:
        """Everything after acceptance: transcribe / read / see, search, rank, answer."""
        queries: list[_Query] = []
        see_vector = None
        if clip is not None:
            t0 = time.perf_counter()
            heard = await self._submit(
                "speech", (clip, req.language, req.knowledge_base), req.timeout
            )
            timings.transcribe_us += _us(t0)
            yield Transcript(heard.text, heard.language, True)
            if heard.text.strip():
                queries.append(_Query(heard.text.strip(), heard=True))
        if req.image is not None:
            from supportqa_server.vision.images import load_image

            t0 = time.perf_counter()
            s = self.settings
            image = await asyncio.get_running_loop().run_in_executor(
                self._decode_exec,
                lambda: load_image(req.image.data, req.image.mime_type,
                                   max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels,
                                   max_decode_bytes=s.max_image_decode_bytes),
            )
            timings.decode_us += _us(t0)
            if self.reader is not None:
                from supportqa_server.vision.ocr import joined_text, question_text

                t0 = time.perf_counter()
                lines = await self._submit("ocr", image, req.timeout)
                timings.read_us += _us(t0)
                yield ImageText(tuple((ln.text, float(ln.confidence)) for ln in lines))
                # The question's block leads; all the text read (titles, error codes in
                # headers) joins at half weight. Image eval: docs/benchmarks/quality.md.
                read, every = question_text(lines), joined_text(lines)
                if read.strip():
                    queries.append(_Query(read[: s.max_text_chars], (READ,)))
                if every.strip() and every != read:
                    queries.append(_Query(every[: s.max_text_chars], (READ,), 0.5))
            if self.image_encoder is not None:
                t0 = time.perf_counter()
                see_vector = await self._submit("image encoder", image, req.timeout)
                timings.embed_us += _us(t0)
        if req.text.strip():
            queries.append(_Query(req.text.strip()))
        threshold = (
            req.min_score if req.min_score is not None
            else self.settings.threshold_for(req.knowledge_base)
        )
        if not queries and see_vector is None:
            what = "speech in the audio" if clip is not None else "readable text in the image"
            yield NoAnswer(f"no confident answer: found no {what}", 0.0, threshold)
            timings.total_us = _us(t_start)
            yield Done(timings)
            return
        lists = await asyncio.gather(*(self._ranked(req, q, timings) for q in queries))
        weighted = [(q.weight, r) for q, r in zip(queries, lists, strict=True)]
        if see_vector is not None:
            weighted.append((1.0, await self._ranked_see(req, see_vector, timings)))
        t0 = time.perf_counter()
        ranked = weighted[0][1] if len(weighted) == 1 else fuse_lists(weighted)
        events = self._answers(req, ranked, threshold)
        timings.rank_us += _us(t0)
        for ev in events:
            yield ev
        timings.total_us = _us(t_start)
        yield Done(timings)

    async def _ranked(self, req: AskRequest, q: _Query, timings: Timings) -> list[RankedEntry]:
        opts = self._heard_rank_options if q.heard else self.rank_options
        head = self._head(req.knowledge_base) if opts.head_weight > 0 else None
        limit = (max(MIN_ROWS_HEAD, req.top_k * ROWS_PER_ANSWER_HEAD) if head is not None
                 else max(MIN_ROWS, req.top_k * ROWS_PER_ANSWER))
        lexical_limit = min(limit, LEXICAL_ROWS) if self.rank_options.lexical_weight > 0 else 0
        t0 = time.perf_counter()
        found = await self._submit("text encoder", _SearchItem(
            req.knowledge_base, q.text, limit, lexical_limit, req.locale, req.tags, head
        ), req.timeout)
        timings.embed_us += _us(t0) - found.search_us - found.head_us
        timings.search_us += found.search_us
        t0 = time.perf_counter()
        ranked = rank(found.dense, found.lexical, opts, extra_routes=q.routes, head=found.head)
        timings.rank_us += _us(t0) + found.head_us
        return ranked

    async def _ranked_see(
        self, req: AskRequest, vector: np.ndarray, timings: Timings
    ) -> list[RankedEntry]:
        assert self.store is not None
        t0 = time.perf_counter()
        (hits,) = await asyncio.get_running_loop().run_in_executor(
            self._store_exec,
            lambda: self.store.search_images(req.knowledge_base, vector[None, :], limit=MIN_ROWS),
        )
        timings.search_us += _us(t0)
        best: dict[str, RankedEntry] = {}
        for h in hits:
            if h.entry_id not in best:
                # CLIP cosines of matching pairs sit near 0.3; map them onto [0, 1] so the
                # threshold means the same across routes (see docs/benchmarks/quality.md).
                score = max(0.0, min(1.0, h.score))
                best[h.entry_id] = RankedEntry(h.entry_id, score, score, {SEE}, h.text)
        return sorted(best.values(), key=lambda r: -r.fused)

    def _answers(
        self, req: AskRequest, ranked: list[RankedEntry], threshold: float
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
            out.append(
                Answer(len(out) + 1, entry, r.score, tuple(sorted(r.routes)), r.matched_text)
            )
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

    def validate_entry(self, index: int, e: EntryData, knowledge_base: str) -> None:
        """Raises InvalidInput naming the entry when it cannot be written."""
        where = f"entry #{index}" + (f" (id {short_id(e.id)})" if e.id else "")
        if not _KB_RE.match(knowledge_base):
            raise InvalidInput(
                f"{where}: knowledge base name {knowledge_base!r} is invalid: use 1-64 of "
                "A-Z a-z 0-9 _"
            )
        if not e.id.strip():
            raise InvalidInput(f"{where} has no id: give every entry a stable unique id")
        if not e.answer.strip():
            raise InvalidInput(f"{where} has no answer: every entry needs the answer text")
        if len(e.questions) > MAX_QUESTIONS:
            raise InvalidInput(
                f"{where} has {len(e.questions)} paraphrases; the limit is {MAX_QUESTIONS}"
            )
        if (why := unfit(e)) is not None:
            raise InvalidInput(f"{where}: {why}")

    async def upsert(
        self,
        knowledge_base: str,
        entries: Sequence[EntryData],
        images: Sequence[Sequence[ImageInput]] | None = None,
    ) -> UpsertResult:
        """Embeds and writes validated entries of one knowledge base.

        images[i] are the pictures of entries[i]; with CLIP configured they and the entry's
        texts are embedded into the See route's space, otherwise they are only counted.
        """
        store = self._require_ready()
        loop = asyncio.get_running_loop()
        texts = [[t for _, t in e.texts()] for e in entries]
        flat = [t for ts in texts for t in ts]
        assert self.encoder is not None
        # A slice of WRITE_ENCODE_TEXTS at a time, each its own job on the model thread:
        # questions' batches run between the slices, so a bulk ingest holds a question back
        # by one slice, not by its whole batch of entries.
        vecs = np.concatenate([
            await loop.run_in_executor(
                self._model_exec, self.encoder.encode_sorted, flat[i : i + WRITE_ENCODE_TEXTS])
            for i in range(0, len(flat), WRITE_ENCODE_TEXTS)
        ])
        per_entry = _split(vecs, [len(ts) for ts in texts])
        see = None
        if self.image_encoder is not None:
            entries, see = await self._see_vectors(entries, texts, images)
        replaced, rows = await loop.run_in_executor(
            self._store_exec, store.upsert, knowledge_base, entries, per_entry, see
        )
        self._head(knowledge_base)  # retrain now rather than on the next question
        return UpsertResult(len(entries), replaced, rows)

    async def _see_vectors(
        self, entries: Sequence[EntryData], texts: list[list[str]],
        images: Sequence[Sequence[ImageInput]] | None,
    ) -> tuple[list[EntryData], list[np.ndarray]]:
        """CLIP vectors per entry (its images, then its texts) and entries with see_rows set."""
        from supportqa_server.vision.images import load_image

        assert self.image_encoder is not None
        enc = self.image_encoder
        s = self.settings
        loop = asyncio.get_running_loop()
        pictures = []
        for i, e in enumerate(entries):
            for j, img in enumerate((images or [[]] * len(entries))[i]):
                try:
                    pictures.append(await loop.run_in_executor(
                        self._decode_exec,
                        lambda img=img: load_image(img.data, img.mime_type,
                                                   max_bytes=s.max_image_bytes,
                                                   max_pixels=s.max_image_pixels,
                                   max_decode_bytes=s.max_image_decode_bytes),
                    ))
                except (InvalidInput, TooLarge) as err:
                    raise type(err)(f"entry {e.id!r}, image {j + 1}: {err}") from err
        counts = [len((images or [[]] * len(entries))[i]) for i in range(len(entries))]
        flat_texts = [t for ts in texts for t in ts]
        img_vecs = (await loop.run_in_executor(self._model_exec, enc.embed_images, pictures)
                    if pictures else np.zeros((0, enc.dim), np.float32))
        txt_vecs = await loop.run_in_executor(self._model_exec, enc.embed_texts, flat_texts)
        img_split = _split(img_vecs, counts)
        txt_split = _split(txt_vecs, [len(ts) for ts in texts])
        out_entries, out_vecs = [], []
        for e, iv, tv in zip(entries, img_split, txt_split, strict=True):
            out_entries.append(replace(e, image_count=len(iv), see_rows=len(iv) + len(tv)))
            out_vecs.append(np.concatenate([iv, tv]) if len(iv) else tv)
        return out_entries, out_vecs

    async def delete(self, knowledge_base: str, ids: Sequence[str]) -> tuple[int, list[str]]:
        store = self._require_ready()
        deleted = await asyncio.get_running_loop().run_in_executor(
            self._store_exec, store.delete, knowledge_base, list(ids)
        )
        self._head(knowledge_base)
        return deleted

    def get(self, knowledge_base: str, entry_id: str) -> EntryData:
        return self._require_ready().get(knowledge_base, entry_id)

    def entry(self, knowledge_base: str, entry_id: str) -> EntryData | None:
        """The stored entry, or None (also for an unknown knowledge base)."""
        return self._require_ready().entry(knowledge_base, entry_id)

    def stats(self, knowledge_base: str = "") -> list[tuple[str, int, int, int, float, str]]:
        """(name, entries, rows, image rows, threshold, entry head state) per knowledge base."""
        store = self._require_ready()
        names = [knowledge_base] if knowledge_base else store.knowledge_bases()
        return [(n, *store.counts(n), self.settings.threshold_for(n), self.head_state(n))
                for n in names]
