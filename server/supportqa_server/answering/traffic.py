"""What each answered question leaves in the question log (knowledge/questions.py): its trip,
recorded as the answer's events pass; its text masked; written off the answer path. And the
calls on the log: Feedback, forgetting a conversation, suggestions."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import numpy as np

from supportqa_server.answering import types
from supportqa_server.answering.types import Accepted, Answer, Done, NoAnswer, Transcript
from supportqa_server.errors import InvalidInput
from supportqa_server.knowledge.entries import key_of
from supportqa_server.knowledge.questions import (
    ANSWERED,
    CLARIFY,
    FLUSH_S,
    NO_ANSWER,
    NOT_HEARD,
    TOP_ANSWERS,
    Feedback,
    LoggedQuestion,
    QuestionLog,
)
from supportqa_server.knowledge.writer import check_kb_name
from supportqa_server.learning import Suggestion, SuggestOptions, suggest
from supportqa_server.learning.vectors import rows_of
from supportqa_server.runtime.logs import mask
from supportqa_server.runtime.settings import Settings

log = logging.getLogger(__name__)

FLUSH_ROWS = 256  # queued rows that start a flush before FLUSH_S is up
PRUNE_EVERY_S = 600.0  # retention (SUPPORTQA_QUESTION_LOG_DAYS, _MAX_ROWS) is applied this often
CLOSE_WAIT_S = 5.0  # on shutdown, how long masked questions still being embedded are awaited
# Rows of a knowledge base Suggest scores questions against: (256, 100k) float32 cosines a chunk
SUGGEST_MAX_ROWS = 100_000


@dataclass(eq=False)
class Trip:
    """One question as its answer stream passes: filled by the servicer (`saw`) and by the
    search (`searched`), handed to `Traffic.record` once the stream is done."""

    knowledge_base: str = ""
    text: str = ""  # typed, stripped
    conversation_id: str = ""  # Question.metadata["conversation_id"]
    request_id: str = ""
    transcript: str = ""  # the final one, of a voice question
    outcome: str = ""  # answered | no_answer | clarify
    top: list[tuple[str, float]] = field(default_factory=list)  # (entry id, score), best first
    best_score: float = 0.0
    searched: list[tuple[str, float, np.ndarray]] = field(default_factory=list)  # text, weight
    done: bool = False

    def saw(self, ev) -> None:
        """Records what an answering event says."""
        if isinstance(ev, Accepted):
            self.request_id = ev.request_id
        elif isinstance(ev, Transcript) and ev.final:
            self.transcript = ev.text.strip()
        elif isinstance(ev, Answer):
            if len(self.top) < TOP_ANSWERS:
                self.top.append((ev.entry.id, float(ev.score)))
            if ev.rank == 1:
                self.best_score, self.outcome = float(ev.score), self.outcome or ANSWERED
        elif isinstance(ev, NoAnswer):
            self.best_score, self.outcome = float(ev.best_score), NO_ANSWER
        elif isinstance(ev, types.NotHeard):  # nothing to learn from: never a suggestion
            self.outcome = NOT_HEARD
        elif isinstance(ev, Done):
            self.done = True
        elif isinstance(ev, getattr(types, "Clarify", ())):  # sent before the answers
            self.outcome = CLARIFY

    def next_turn(self) -> None:
        """Forgets the question just recorded, keeping the knowledge base and conversation:
        a whole-call Converse asks one question a turn, each logged on its own."""
        self.text = self.request_id = self.transcript = self.outcome = ""
        self.top, self.searched = [], []
        self.best_score, self.done = 0.0, False

    def question(self) -> tuple[str, np.ndarray] | None:
        """The text to log and its vector as searched: the typed text, else the transcript,
        else the text read from the image with the most weight; None when no text was
        searched (an image matched by CLIP alone)."""
        for wanted in (self.text, self.transcript):
            for text, _, vector in self.searched:
                if wanted and text == wanted:
                    return text, vector
        if self.searched:
            text, _, vector = max(self.searched, key=lambda s: s[1])
            return text, vector
        return None


_trip: contextvars.ContextVar[Trip | None] = contextvars.ContextVar("supportqa_trip",
                                                                   default=None)


def begin(knowledge_base: str = "", text: str = "", conversation_id: str = "") -> Trip:
    """A trip for the question the current call asks; the search adds its vectors to it
    (tasks the call starts see it too)."""
    trip = Trip(knowledge_base, text.strip(), conversation_id)
    _trip.set(trip)
    return trip


def searched(text: str, weight: float, vector: np.ndarray) -> None:
    """Records a text the current call's question searched with, and its vector."""
    trip = _trip.get()
    if trip is not None:
        trip.searched.append((text, weight, vector))


class Traffic:
    """Hands finished trips to the question log: masked (unless SUPPORTQA_LOG_QUESTIONS=raw;
    a masked text is embedded again, so the vector kept is the text's), queued, and written
    every FLUSH_S on a store thread; old rows pruned every PRUNE_EVERY_S.

    Args:
        settings: The server's settings (log_questions, retention).
        log: The question log.
        store: The knowledge store (entries and rows, for Feedback and suggestions).
        store_exec: The store threads.
        write_vectors: Models.write_vectors: embeds texts on the model thread (a masked
            question's).
    """

    def __init__(self, settings: Settings, log: QuestionLog, store, store_exec,
                 write_vectors: Callable[[list[list[str]]], Awaitable[list[np.ndarray]]]
                 ) -> None:
        self.settings, self.log, self.store, self.store_exec = settings, log, store, store_exec
        self.write_vectors = write_vectors
        self.raw = settings.log_questions == "raw"
        self._embedding: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self.skipped = 0  # finished questions with no text to log
        self.failed = 0  # questions lost before they reached the log's queue

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    def mask(self, text: str) -> str:
        return text if self.raw else mask(text)

    def record(self, trip: Trip) -> None:
        """Queues a finished question for the log; never raises and never waits (a failure
        is logged and counted)."""
        try:
            if not trip.done or not trip.request_id:
                return  # refused or failed: not answered
            found = trip.question()
            if found is None:
                self.skipped += 1
                return
            text, vector = found
            shown = self.mask(text)
            q = LoggedQuestion(
                trip.request_id, trip.knowledge_base, shown, vector, trip.outcome or NO_ANSWER,
                time.time(), tuple(trip.top), trip.best_score,
                key_of(trip.conversation_id) if trip.conversation_id else "")
            if shown == text:
                self._add(q)
                return
            task = asyncio.get_running_loop().create_task(self._masked(q))
            self._embedding.add(task)
            task.add_done_callback(self._embedding.discard)
        except Exception:  # noqa: BLE001 - the log must never fail an answer
            log.exception("question log: a question was not recorded")
            self.failed += 1

    async def _masked(self, q: LoggedQuestion) -> None:
        try:
            (vectors,) = await self.write_vectors([[q.text]])  # (1, d)
            self._add(replace(q, vector=vectors[0]))
        except Exception as e:  # noqa: BLE001
            log.warning("question log: a masked question was not embedded: %s", e)
            self.failed += 1

    def _add(self, q: LoggedQuestion) -> None:
        self.log.add(q)
        if self.log.pending >= FLUSH_ROWS:
            self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        prune_at = 0.0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_S)
            except TimeoutError:
                pass
            self._wake.clear()
            prune = time.monotonic() >= prune_at
            if prune:
                prune_at = time.monotonic() + PRUNE_EVERY_S
            await loop.run_in_executor(self.store_exec, self._flush, prune)

    def _flush(self, prune: bool) -> None:
        self.log.flush()
        if prune:
            self.log.prune()

    async def settle(self) -> None:
        """Waits for the masked questions being embedded, then writes every queued row."""
        if self._embedding:
            await asyncio.wait(set(self._embedding), timeout=CLOSE_WAIT_S)
        await asyncio.get_running_loop().run_in_executor(self.store_exec, self.log.flush)

    async def close(self) -> None:
        """Stops the writer and writes what is queued (before the store threads stop)."""
        if self._runner is not None:
            self._runner.cancel()
        await self.settle()
        for task in self._embedding:
            task.cancel()

    async def _on_store(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.store_exec, fn, *args)

    async def feedback(self, fb: Feedback, can_see: Callable[[str], bool]) -> LoggedQuestion:
        """Stores Feedback on its question (QuestionLog.feedback): in fb.knowledge_base, or
        in every knowledge base ``can_see`` lets the caller use."""
        fb.check()
        if fb.knowledge_base:
            check_kb_name(fb.knowledge_base)
            self.store.counts(fb.knowledge_base)  # NotFound naming the knowledge bases there are
        fb = replace(fb, comment=self.mask(fb.comment))
        await self.settle()

        def run() -> LoggedQuestion:
            kbs = ([fb.knowledge_base] if fb.knowledge_base else
                   [kb for kb in self.log.knowledge_bases() if can_see(kb)])
            return self.log.feedback(kbs, fb, lambda kb, e: self.store.entry(kb, e) is not None)

        return await self._on_store(run)

    async def forget(self, conversation_id: str, kb: str = "") -> int:
        """Deletes a conversation's questions, in kb or every knowledge base; returns how
        many."""
        if not conversation_id:
            raise InvalidInput("conversation_id is empty: send the Question.metadata"
                               "[\"conversation_id\"] the questions were asked with")
        if kb:
            check_kb_name(kb)
            self.store.counts(kb)
        await self.settle()
        return await self._on_store(self.log.forget, conversation_id, [kb] if kb else None)

    async def suggest(self, kb: str, options: SuggestOptions) -> list[Suggestion]:
        """Suggestions from a knowledge base's logged questions (learning/suggest.py)."""
        options.check()
        self.store.counts(kb)  # NotFound naming the knowledge bases there are

        def run() -> list[Suggestion]:
            since = time.time() - self.settings.question_log_days * 86400
            questions = self.log.read(kb, since=since, unanswered=True,
                                      limit=options.max_questions)
            rows, entries = rows_of(self.store, kb, SUGGEST_MAX_ROWS)
            return suggest(questions, entries, rows, options)

        await self.settle()
        return await self._on_store(run)
