"""A question's trip: decode -> transcribe / read / embed -> search -> rank -> answer. No gRPC here."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .batching import MicroBatcher
from .errors import InvalidInput, NotAvailable, NotReady, TooLarge
from .rank import RankOptions, RankedEntry, rank
from .settings import DEFAULT_KB, KB_NAME_PATTERN, Settings
from .store import EntryData, KnowledgeStore, RowHit

log = logging.getLogger(__name__)

MAX_TOP_K = 50
DEFAULT_TOP_K = 5
ROWS_PER_ANSWER = 40  # rows fetched per requested answer: an entry owns several rows
MIN_ROWS = 200  # rows fetched at least, so aggregation sees every paraphrase of the leaders
MAX_QUESTIONS = 200  # paraphrases per entry
MAX_ID_CHARS = 256
_KB_RE = re.compile(KB_NAME_PATTERN)


@dataclass(frozen=True)
class AudioInput:
    data: bytes
    format: str = ""  # "" (sniff) | wav | flac | ogg | mp3 | pcm16
    sample_rate_hz: int = 0
    channels: int = 0


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    mime_type: str = ""


@dataclass(frozen=True)
class AskRequest:
    """One question, validated by `Pipeline.check`."""

    text: str = ""
    audio: AudioInput | None = None
    image: ImageInput | None = None
    knowledge_base: str = DEFAULT_KB
    top_k: int = DEFAULT_TOP_K
    min_score: float | None = None  # None: the knowledge base's threshold
    locale: str = ""
    tags: tuple[str, ...] = ()
    language: str = ""  # spoken-language hint, ISO 639-1
    timeout: float | None = None  # seconds left on the caller's deadline


# Events of an answer stream, in the order they are produced.
@dataclass(frozen=True)
class Accepted:
    request_id: str


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    final: bool = True


@dataclass(frozen=True)
class ImageText:
    lines: tuple[tuple[str, float], ...]  # (text, confidence) in reading order


@dataclass(frozen=True)
class Answer:
    rank: int
    entry: EntryData
    score: float
    routes: tuple[str, ...]
    matched_text: str


@dataclass(frozen=True)
class NoAnswer:
    reason: str
    best_score: float
    threshold: float


@dataclass
class Timings:
    """Microseconds per stage."""

    decode_us: int = 0
    transcribe_us: int = 0
    read_us: int = 0
    embed_us: int = 0
    search_us: int = 0
    rank_us: int = 0
    total_us: int = 0


@dataclass(frozen=True)
class Done:
    timings: Timings


Event = Accepted | Transcript | ImageText | Answer | NoAnswer | Done


@dataclass(frozen=True)
class _SearchItem:
    knowledge_base: str
    vector: np.ndarray
    text: str
    limit: int
    locale: str
    tags: tuple[str, ...]


@dataclass
class UpsertResult:
    written: int = 0
    replaced: int = 0
    rows: int = 0


@dataclass
class Component:
    name: str
    model: str = ""
    device: str = ""
    enabled: bool = True
    detail: str = ""


def _us(t0: float) -> int:
    return int((time.perf_counter() - t0) * 1e6)


@dataclass
class Pipeline:
    """Owns the models, their batchers and the store; every public method is async."""

    settings: Settings
    rank_options: RankOptions = field(default_factory=RankOptions)

    def __post_init__(self) -> None:
        self.ready = False
        self.store: KnowledgeStore | None = None
        self.encoder = None
        self.device = "cpu"
        self.components: list[Component] = []
        # One thread per model: its batcher runs one batch at a time there, so no locks.
        self._text_exec = ThreadPoolExecutor(1, thread_name_prefix="text-encoder")
        self._store_exec = ThreadPoolExecutor(
            self.settings.store_threads, thread_name_prefix="store"
        )
        self._text_batcher: MicroBatcher[str, np.ndarray] | None = None
        self._search_batcher: MicroBatcher[_SearchItem, tuple] | None = None

    # Start-up and shutdown

    def load(self) -> None:
        """Loads models and opens the store (blocking; call from a thread)."""
        from .devices import configure_threads, resolve_device
        from .encoder import TextEncoder

        s = self.settings
        configure_threads(s.torch_threads)
        self.device = resolve_device(s.device)
        t0 = time.perf_counter()
        self.encoder = TextEncoder(s.text_model, self.device)
        log.info("text encoder %s on %s in %.1f s", self.encoder.model_name, self.device,
                 time.perf_counter() - t0)
        self.components.append(Component("text_encoder", self.encoder.model_name, self.device))
        uri = s.milvus_uri
        if not uri:
            s.data_dir.mkdir(parents=True, exist_ok=True)
            uri = str((s.data_dir / "milvus.db").resolve())
        self.store = KnowledgeStore(
            uri, self.encoder.dim, token=s.milvus_token, db_name=s.milvus_db, lexical=s.lexical
        )
        self.store.open()
        self.components.append(Component("store", uri if not s.milvus_token else uri, ""))
        for name in ("speech", "ocr", "image_encoder"):
            self.components.append(
                Component(name, enabled=False, detail="not available in this version")
            )

    async def start(self) -> None:
        """Loads everything off the event loop, then starts the batchers."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._text_exec, self.load)
        s = self.settings
        self._text_batcher = MicroBatcher(
            self._encode_batch, executor=self._text_exec, max_batch=s.max_batch,
            max_wait_ms=s.max_wait_ms, max_queue=s.max_queue, name="text encoder",
        )
        self._search_batcher = MicroBatcher(
            self._search_batch, executor=self._store_exec, max_batch=s.max_batch,
            max_wait_ms=0.0, max_queue=s.max_queue, name="search",
        )
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        for b in (self._text_batcher, self._search_batcher):
            if b is not None:
                await b.close()
        if self.store is not None:
            self.store.close()
        self._text_exec.shutdown(wait=False)
        self._store_exec.shutdown(wait=False)

    def _require_ready(self) -> KnowledgeStore:
        if not self.ready or self.store is None:
            raise NotReady("the server is still loading its models; retry in a few seconds")
        return self.store

    # Model calls, run on their executors by the batchers

    def _encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        assert self.encoder is not None
        return list(self.encoder.encode(texts))

    def _search_batch(self, items: list[_SearchItem]) -> list[tuple]:
        assert self.store is not None
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((it.knowledge_base, it.limit, it.locale, it.tags), []).append(i)
        out: list = [None] * len(items)
        for (kb, limit, locale, tags), idx in groups.items():
            try:
                found = self.store.search(
                    kb, np.stack([items[i].vector for i in idx]), [items[i].text for i in idx],
                    limit=limit, locale=locale, tags=tags,
                )
            except Exception as e:  # noqa: BLE001 - one group's failure is its callers' alone
                found = [e] * len(idx)
            for i, r in zip(idx, found, strict=True):
                out[i] = r
        return out

    # Validation

    def check(self, req: AskRequest) -> AskRequest:
        """Validates a question; raises InvalidInput/TooLarge/NotFound with what to fix."""
        store = self._require_ready()
        if not _KB_RE.match(req.knowledge_base):
            raise InvalidInput(
                f"knowledge base name {req.knowledge_base!r} is invalid: use 1-64 of A-Z a-z 0-9 _"
            )
        text = req.text.strip()
        if not text and req.audio is None and req.image is None:
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
        if req.audio is not None:
            raise NotAvailable("voice questions are not supported by this server yet")
        if req.image is not None:
            raise NotAvailable("image questions are not supported by this server yet")
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
        text = req.text.strip()
        t0 = time.perf_counter()
        assert self._text_batcher is not None and self._search_batcher is not None
        vector = await self._text_batcher.submit(text, timeout=req.timeout)
        timings.embed_us = _us(t0)
        t0 = time.perf_counter()
        limit = max(MIN_ROWS, req.top_k * ROWS_PER_ANSWER)
        found = await self._search_batcher.submit(
            _SearchItem(req.knowledge_base, vector, text, limit, req.locale, req.tags),
            timeout=req.timeout,
        )
        if isinstance(found, Exception):
            raise found
        dense, lexical = found
        timings.search_us = _us(t0)
        t0 = time.perf_counter()
        ranked = self._rank(dense, lexical)
        threshold = (
            req.min_score if req.min_score is not None
            else self.settings.threshold_for(req.knowledge_base)
        )
        events = self._answers(req, ranked, threshold)
        timings.rank_us = _us(t0)
        for ev in events:
            yield ev
        timings.total_us = _us(t_start)
        yield Done(timings)

    def _rank(self, dense: Sequence[RowHit], lexical: Sequence[RowHit]) -> list[RankedEntry]:
        return rank(dense, lexical, self.rank_options)

    def _answers(
        self, req: AskRequest, ranked: list[RankedEntry], threshold: float
    ) -> list[Answer | NoAnswer]:
        assert self.store is not None
        out: list[Answer | NoAnswer] = []
        for r in ranked:
            if len(out) >= req.top_k:
                break
            if r.score < threshold:
                continue
            entry = self.store.entry(req.knowledge_base, r.entry_id)
            if entry is None:  # deleted since the search
                continue
            out.append(
                Answer(len(out) + 1, entry, r.score, tuple(sorted(r.routes)), r.matched_text)
            )
        if not out:
            best = max((r.score for r in ranked), default=0.0)
            reason = (
                f"no confident answer: the best match scores {best:.2f}, below the threshold "
                f"{threshold:.2f}" if ranked else "no confident answer: nothing matched"
            )
            out.append(NoAnswer(reason, best, threshold))
        return out

    # Knowledge

    def validate_entry(self, index: int, e: EntryData, knowledge_base: str) -> None:
        """Raises InvalidInput naming the entry when it cannot be written."""
        where = f"entry #{index}" + (f" (id {e.id!r})" if e.id else "")
        if not _KB_RE.match(knowledge_base):
            raise InvalidInput(
                f"{where}: knowledge base name {knowledge_base!r} is invalid: use 1-64 of "
                "A-Z a-z 0-9 _"
            )
        if not e.id.strip():
            raise InvalidInput(f"{where} has no id: give every entry a stable unique id")
        if len(e.id) > MAX_ID_CHARS or "\x1f" in e.id:
            raise InvalidInput(f"{where}: ids have at most {MAX_ID_CHARS} printable characters")
        if not e.answer.strip():
            raise InvalidInput(f"{where} has no answer: every entry needs the answer text")
        if len(e.questions) > MAX_QUESTIONS:
            raise InvalidInput(
                f"{where} has {len(e.questions)} paraphrases; the limit is {MAX_QUESTIONS}"
            )

    async def upsert(self, knowledge_base: str, entries: Sequence[EntryData]) -> UpsertResult:
        """Embeds and writes validated entries of one knowledge base."""
        store = self._require_ready()
        loop = asyncio.get_running_loop()
        texts = [[t for _, t in e.texts()] for e in entries]
        flat = [t for ts in texts for t in ts]
        assert self.encoder is not None
        vecs = await loop.run_in_executor(self._text_exec, self.encoder.encode_sorted, flat)
        per_entry, start = [], 0
        for ts in texts:
            per_entry.append(vecs[start : start + len(ts)])
            start += len(ts)
        replaced, rows = await loop.run_in_executor(
            self._store_exec, store.upsert, knowledge_base, entries, per_entry
        )
        return UpsertResult(len(entries), replaced, rows)

    async def delete(self, knowledge_base: str, ids: Sequence[str]) -> tuple[int, list[str]]:
        store = self._require_ready()
        return await asyncio.get_running_loop().run_in_executor(
            self._store_exec, store.delete, knowledge_base, list(ids)
        )

    def get(self, knowledge_base: str, entry_id: str) -> EntryData:
        return self._require_ready().get(knowledge_base, entry_id)

    def stats(self, knowledge_base: str = "") -> list[tuple[str, int, int, float]]:
        """(name, entries, rows, threshold) per knowledge base."""
        store = self._require_ready()
        names = [knowledge_base] if knowledge_base else store.knowledge_bases()
        out = []
        for n in names:
            entries, rows = store.counts(n)
            out.append((n, entries, rows, self.settings.threshold_for(n)))
        return out
