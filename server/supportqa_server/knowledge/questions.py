"""The question log: every answered question of a knowledge base, in a Milvus collection of
its own (`supportqa_NAME_questions`) that every replica on one Milvus shares. A row is keyed
by the request id the caller got (Accepted.request_id) and holds the question's text as
logged (masked), its vector, the outcome, the top answers' scores, Feedback once given, the
conversation's key and the time. Rows are buffered and written in batches on a store thread,
so no answer waits for the log; a write that fails is logged, counted and retried."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from supportqa_server.errors import InvalidInput, NotFound, TooLarge, WrongModel
from supportqa_server.knowledge.entries import (
    KEY_HEX,
    MAX_ID_BYTES,
    MAX_TEXT_BYTES,
    key_of,
    literal,
    short_id,
)
from supportqa_server.knowledge.layout import INSERT_BATCH, PREFIX, is_server, scan, vector_width

log = logging.getLogger(__name__)

SUFFIX = "_questions"
ANSWERED, NO_ANSWER, CLARIFY = "answered", "no_answer", "clarify"  # a question's outcome
NOT_HEARD = "not_heard"  # audio not understood: the caller was asked to repeat
NO_FEEDBACK, HELPFUL, NOT_HELPFUL = 0, 1, 2  # the feedback field
REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # as the pipeline makes them: uuid4().hex
MAX_DOC_BYTES = 16384  # the row's JSON: top answers' ids (256 bytes each at most), feedback
MAX_COMMENT_CHARS = 1000
TOP_ANSWERS = 5  # answers whose (entry id, score) a row keeps
MAX_PENDING = 10_000  # rows waiting for a write; beyond it new rows are dropped (and counted)
MAX_TRIES = 3  # writes of one row before it is dropped
# The writer flushes at least this often (s): what a Feedback on another replica may wait for.
FLUSH_S = 1.0
FIELDS = ["request_id", "at", "outcome", "feedback", "conversation", "best_score", "text", "doc",
          "vector"]


def questions_name(kb: str) -> str:
    return f"{PREFIX}{kb}{SUFFIX}"


@dataclass(frozen=True)
class LoggedQuestion:
    """One row of the question log."""

    request_id: str  # Accepted.request_id / AnswerSet.request_id
    knowledge_base: str
    text: str  # as logged: masked unless SUPPORTQA_LOG_QUESTIONS=raw
    vector: np.ndarray = field(compare=False)  # (d,) unit vector of text
    outcome: str  # answered | no_answer | clarify
    at: float  # when it was answered, seconds since the epoch
    top: tuple[tuple[str, float], ...] = ()  # (entry id, confidence) of the answers, best first
    best_score: float = 0.0  # confidence of the first answer, or NoAnswer.best_score
    conversation_key: str = ""  # key_of(Question.metadata["conversation_id"]); "" when none
    feedback: int = NO_FEEDBACK  # NO_FEEDBACK | HELPFUL | NOT_HELPFUL
    feedback_entry: str = ""  # the entry the feedback named as the right one
    comment: str = ""  # the feedback's free text, masked as the question
    feedback_at: float = 0.0

    @property
    def answered_entry(self) -> str:
        """The entry given as the first answer; "" when there was none."""
        return self.top[0][0] if self.top and self.outcome != NO_ANSWER else ""


@dataclass(frozen=True)
class Feedback:
    """What a caller says about an answer (the Feedback rpc)."""

    request_id: str
    helpful: bool | None  # None: not said, which is refused
    entry_id: str = ""  # the entry that was right, when known
    comment: str = ""
    knowledge_base: str = ""  # where the question was asked; "": every one the caller sees

    def check(self) -> None:
        """Raises InvalidInput / TooLarge saying what to fix."""
        if not REQUEST_ID.fullmatch(self.request_id):
            raise InvalidInput(
                f"request_id {self.request_id[:40]!r} is not a request id: send the 32 hex "
                "digits the answer carried (Accepted.request_id or AnswerSet.request_id)")
        if self.helpful is None:
            raise InvalidInput("say whether the answer helped: set verdict to VERDICT_HELPFUL "
                               "or VERDICT_NOT_HELPFUL")
        if len(self.entry_id.encode()) > MAX_ID_BYTES:
            raise InvalidInput(f"entry_id is {len(self.entry_id.encode())} bytes; ids have at "
                               f"most {MAX_ID_BYTES}")
        if len(self.comment) > MAX_COMMENT_CHARS:
            raise TooLarge(f"the comment is {len(self.comment)} characters; the limit is "
                           f"{MAX_COMMENT_CHARS}")


def _clip(text: str, max_bytes: int) -> str:
    """text cut to at most max_bytes of UTF-8, on a character boundary."""
    data = text.encode("utf-8", "surrogatepass")
    return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", "ignore")


def _row(q: LoggedQuestion) -> dict:
    doc = {"top": [[e, round(float(s), 4)] for e, s in q.top[:TOP_ANSWERS]]}
    if q.feedback:
        doc.update(feedback_entry=q.feedback_entry, comment=q.comment,
                   feedback_at=round(q.feedback_at, 3))
    return {
        "request_id": q.request_id, "at": int(q.at * 1000), "outcome": q.outcome,
        "feedback": int(q.feedback), "conversation": q.conversation_key,
        "best_score": float(q.best_score), "text": _clip(q.text, MAX_TEXT_BYTES),
        "doc": _clip(json.dumps(doc, ensure_ascii=False), MAX_DOC_BYTES),
        "vector": np.asarray(q.vector, np.float32).tolist(),
    }


def _question(kb: str, r: dict) -> LoggedQuestion:
    doc = json.loads(r["doc"]) if r.get("doc") else {}
    return LoggedQuestion(
        request_id=r["request_id"], knowledge_base=kb, text=r["text"],
        vector=np.asarray(r["vector"], np.float32), outcome=r["outcome"], at=r["at"] / 1000,
        top=tuple((e, float(s)) for e, s in doc.get("top", ())),
        best_score=float(r["best_score"]), conversation_key=r["conversation"],
        feedback=int(r["feedback"]), feedback_entry=doc.get("feedback_entry", ""),
        comment=doc.get("comment", ""), feedback_at=float(doc.get("feedback_at", 0.0)),
    )


def _create(client, kb: str, dim: int) -> None:
    from pymilvus import DataType, MilvusClient

    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("request_id", DataType.VARCHAR, is_primary=True, max_length=32)
    s.add_field("at", DataType.INT64)  # ms since the epoch
    s.add_field("outcome", DataType.VARCHAR, max_length=16)
    s.add_field("feedback", DataType.INT64)
    s.add_field("conversation", DataType.VARCHAR, max_length=KEY_HEX)
    s.add_field("best_score", DataType.FLOAT)
    s.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
    s.add_field("doc", DataType.VARCHAR, max_length=MAX_DOC_BYTES)
    s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="IP")
    client.create_collection(questions_name(kb), schema=s, index_params=index,
                             consistency_level="Strong")


class QuestionLog:
    """The question log of every knowledge base on one Milvus. Thread-safe: `add` from any
    thread; the rest are store-thread jobs (they call Milvus).

    Args:
        client: The store's Milvus client (knowledge/client.py TimedClient).
        dim: Width of this server's text vectors.
        uri: The store's URI: on a Milvus server, other replicas write the log too.
        days: Rows older than this are deleted by `prune`.
        max_rows: Rows kept per knowledge base by `prune` (the newest).
    """

    def __init__(self, client, dim: int, *, uri: str, days: float, max_rows: int) -> None:
        self.client, self.dim, self.shared = client, dim, is_server(uri)
        self.days, self.max_rows = days, max_rows
        self._pending: deque[tuple[LoggedQuestion, int]] = deque()  # (row, failed writes)
        self._lock = threading.Lock()  # the pending rows and the counts
        self._flush_lock = threading.Lock()  # one flush at a time
        self._ready: set[str] = set()  # knowledge bases whose collection is made and loaded
        self._refused: dict[str, str] = {}  # knowledge base -> why its rows cannot be written
        self.written = self.failed = self.dropped = 0  # rows

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, q: LoggedQuestion) -> None:
        """Queues a row for the next flush; drops it (counted) when MAX_PENDING wait."""
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                return
            self._pending.append((q, 0))

    def flush(self) -> int:
        """Writes the queued rows, per knowledge base; returns how many were written. Never
        raises: a failed write is logged and counted, and its rows queued again (up to
        MAX_TRIES writes each)."""
        with self._flush_lock:
            with self._lock:
                batch = list(self._pending)
                self._pending.clear()
            by_kb: dict[str, list[tuple[LoggedQuestion, int]]] = {}
            for item in batch:
                by_kb.setdefault(item[0].knowledge_base, []).append(item)
            written = 0
            for kb, items in by_kb.items():
                try:
                    self._ensure(kb)
                    rows = [_row(q) for q, _ in items]
                    for i in range(0, len(rows), INSERT_BATCH):
                        # upsert: a retried batch must not leave two rows of one request
                        self.client.upsert(questions_name(kb), rows[i : i + INSERT_BATCH])
                    written += len(rows)
                except Exception as e:  # noqa: BLE001 - the log must never fail an answer
                    self._failed(kb, items, e)
            with self._lock:
                self.written += written
            return written

    def _failed(self, kb: str, items: list[tuple[LoggedQuestion, int]], e: Exception) -> None:
        self._ready.discard(kb)
        again = [(q, n + 1) for q, n in items if n + 1 < MAX_TRIES and kb not in self._refused]
        with self._lock:
            room = max(0, MAX_PENDING - len(self._pending))
            self._pending.extendleft(reversed(again[:room]))
            self.failed += len(items)
            self.dropped += len(items) - min(len(again), room)
        log.warning("question log of %r: %d rows not written, %d queued again: %s", kb,
                    len(items), min(len(again), room), str(e).splitlines()[0][:300])

    def _ensure(self, kb: str) -> None:
        """Makes and loads a knowledge base's collection, once per process (again after a
        failed write)."""
        if kb in self._ready:
            return
        if kb in self._refused:
            raise WrongModel(self._refused[kb])
        name = questions_name(kb)
        if not self.client.has_collection(name):
            try:
                _create(self.client, kb, self.dim)
            except Exception:
                if not self.client.has_collection(name):  # not another replica's meanwhile
                    raise
        width = vector_width(self.client, name)
        if width != self.dim:
            self._refused[kb] = (f"its question log holds {width}-d vectors and this server's "
                                 f"text model makes {self.dim}-d ones: not logging")
            raise WrongModel(self._refused[kb])
        self.client.load_collection(name)
        self._ready.add(kb)

    def knowledge_bases(self) -> list[str]:
        """The knowledge bases that have a question log, sorted."""
        return sorted(n[len(PREFIX) : -len(SUFFIX)] for n in self.client.list_collections()
                      if n.startswith(PREFIX) and n.endswith(SUFFIX))

    def _has(self, kb: str) -> bool:
        if kb in self._ready:
            return True
        if not self.client.has_collection(questions_name(kb)):
            return False
        self._ensure(kb)
        return True

    def _query(self, kb: str, where: str, fields: list[str] = FIELDS) -> list[dict]:
        return list(self.client.query(questions_name(kb), filter=where, output_fields=fields,
                                      consistency_level="Strong"))

    def _ids(self, kb: str, where: str) -> list[tuple[str, int]]:
        """(request id, at in ms) of every row of kb matching where."""
        return [(r["request_id"], int(r["at"]))
                for batch in scan(self.client, questions_name(kb), ["request_id", "at"],
                                  pk="request_id", where=where)
                for r in batch]

    def _delete(self, kb: str, ids: Sequence[str]) -> None:
        for i in range(0, len(ids), INSERT_BATCH):
            self.client.delete(questions_name(kb), ids=list(ids[i : i + INSERT_BATCH]))

    def get(self, kbs: Sequence[str], request_id: str) -> LoggedQuestion | None:
        """The row of a request in any of kbs, or None."""
        if not REQUEST_ID.fullmatch(request_id):
            return None
        for kb in kbs:
            if self._has(kb):
                if rows := self._query(kb, f"request_id == {literal(request_id)}"):
                    return _question(kb, rows[0])
        return None

    def read(self, kb: str, *, since: float = 0.0, unanswered: bool = False,
             limit: int | None = None) -> list[LoggedQuestion]:
        """A knowledge base's rows asked at or after ``since`` (s), newest first, at most
        ``limit``; with ``unanswered`` only those that got no answer or any feedback."""
        if not self._has(kb):
            return []
        where = f"at >= {int(since * 1000)}"
        if unanswered:
            where += f' and (outcome == "{NO_ANSWER}" or feedback != {NO_FEEDBACK})'
        ids = sorted(self._ids(kb, where), key=lambda p: -p[1])[:limit]
        out: list[LoggedQuestion] = []
        for i in range(0, len(ids), INSERT_BATCH):
            chunk = ", ".join(literal(r) for r, _ in ids[i : i + INSERT_BATCH])
            out += [_question(kb, r) for r in self._query(kb, f"request_id in [{chunk}]")]
        return sorted(out, key=lambda q: -q.at)

    def count(self, kb: str) -> int:
        if not self._has(kb):
            return 0
        (r,) = self._query(kb, "at >= 0", ["count(*)"])
        return int(r["count(*)"])

    def feedback(self, kbs: Sequence[str], fb: Feedback,
                 has_entry: Callable[[str, str], bool]) -> LoggedQuestion:
        """Stores Feedback on its question's row (a later one replaces it) and returns the row.

        Args:
            kbs: Where to look for the request (the caller's knowledge bases).
            fb: The feedback, checked.
            has_entry: Whether (knowledge base, entry id) exists.

        Raises:
            NotFound: no row of that request in kbs.
            InvalidInput: the entry it names is not in the question's knowledge base.
        """
        self.flush()  # a question answered just now is still queued
        found = self.get(kbs, fb.request_id)
        for _ in range(2 if self.shared else 0):  # another replica's rows are up to FLUSH_S late
            if found is not None:
                break
            time.sleep(FLUSH_S)
            found = self.get(kbs, fb.request_id)
        if found is None:
            where = ", ".join(repr(k) for k in kbs) or "none"
            raise NotFound(
                f"request {fb.request_id} is not in the question log (knowledge bases "
                f"searched: {where}): it is unknown, older than SUPPORTQA_QUESTION_LOG_DAYS, "
                "or deleted; send the request_id of an answer this server gave")
        kb = found.knowledge_base
        if fb.entry_id and not has_entry(kb, fb.entry_id):
            raise InvalidInput(f"entry {short_id(fb.entry_id)} is not in knowledge base {kb!r}: "
                               "name the entry that was right, or leave entry_id empty")
        q = replace(found, feedback=HELPFUL if fb.helpful else NOT_HELPFUL,
                    feedback_entry=fb.entry_id, comment=fb.comment, feedback_at=time.time())
        self.client.upsert(questions_name(kb), [_row(q)])
        return q

    def forget(self, conversation_id: str, kbs: Sequence[str] | None = None) -> int:
        """Deletes the rows of one conversation (in kbs, or every knowledge base); returns how
        many. Rows still queued here are written first, and on a Milvus server the other
        replicas' queues get two flushes' time to land."""
        key = key_of(conversation_id)
        self.flush()
        if self.shared:
            time.sleep(2 * FLUSH_S)
        deleted = 0
        for kb in self.knowledge_bases() if kbs is None else kbs:
            if self._has(kb):
                ids = [r for r, _ in self._ids(kb, f"conversation == {literal(key)}")]
                self._delete(kb, ids)
                deleted += len(ids)
        return deleted

    def prune(self, now: float | None = None) -> int:
        """Deletes rows older than ``days`` and, past ``max_rows`` in a knowledge base, its
        oldest; returns how many. Never raises (a failure is logged; the next prune tries
        again)."""
        cutoff = int(((now or time.time()) - self.days * 86400) * 1000)
        deleted = 0
        for kb in self.knowledge_bases():
            try:
                if not self._has(kb):
                    continue
                old = [r for r, _ in self._ids(kb, f"at < {cutoff}")]
                self._delete(kb, old)
                deleted += len(old)
                if (excess := self.count(kb) - self.max_rows) > 0:
                    oldest = sorted(self._ids(kb, "at >= 0"), key=lambda p: p[1])[:excess]
                    self._delete(kb, [r for r, _ in oldest])
                    deleted += len(oldest)
            except Exception as e:  # noqa: BLE001 - retention is retried at the next prune
                log.warning("question log of %r not pruned: %s", kb, str(e).splitlines()[0])
        if deleted:
            log.info("question log: deleted %d old rows", deleted)
        return deleted
