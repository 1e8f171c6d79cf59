"""The question log on a real Milvus Lite in tmp_path: batched writes, Feedback, deletes by
conversation, retention by age and by count, and a failing Milvus that never raises."""

from __future__ import annotations

import time

import numpy as np
import pytest
from supportqa_server.errors import InvalidInput, NotFound
from supportqa_server.knowledge.entries import key_of
from supportqa_server.knowledge.questions import (
    ANSWERED,
    HELPFUL,
    MAX_TRIES,
    NO_ANSWER,
    NO_FEEDBACK,
    NOT_HELPFUL,
    Feedback,
    LoggedQuestion,
    QuestionLog,
    questions_name,
)
from supportqa_server.knowledge.store import KnowledgeStore

DIM = 8


def vec(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i % DIM] = 1.0
    return v


def row(n: int, kb: str = "kb", *, at: float | None = None, conversation: str = "",
        outcome: str = NO_ANSWER, text: str = "") -> LoggedQuestion:
    return LoggedQuestion(
        f"{n:032x}", kb, text or f"question {n}", vec(n), outcome,
        time.time() - 100 + n if at is None else at, top=(("e1", 0.61), ("e2", 0.4)) if outcome ==
        ANSWERED else (), best_score=0.61 if outcome == ANSWERED else 0.3,
        conversation_key=key_of(conversation) if conversation else "")


@pytest.fixture
def store(tmp_path):
    s = KnowledgeStore(str(tmp_path / "milvus.db"), DIM)
    s.open()
    yield s
    s.close()


@pytest.fixture
def qlog(store):
    return QuestionLog(store.client, DIM, uri=store.uri, days=30, max_rows=1000)


def has_entry(kb: str, entry_id: str) -> bool:
    return entry_id in ("e1", "e2")


def test_rows_are_written_in_a_batch_per_knowledge_base_and_read_back(qlog):
    for n in range(5):
        qlog.add(row(n, outcome=ANSWERED if n % 2 else NO_ANSWER, conversation="c1"))
    qlog.add(row(9, "other"))
    assert qlog.pending == 6 and qlog.count("kb") == 0  # nothing written before a flush
    assert qlog.flush() == 6 and qlog.pending == 0
    assert (qlog.count("kb"), qlog.count("other"), qlog.written) == (5, 1, 6)
    assert qlog.knowledge_bases() == ["kb", "other"]
    got = qlog.get(["kb"], f"{3:032x}")
    assert (got.text, got.outcome, got.top, got.answered_entry) == (
        "question 3", ANSWERED, (("e1", 0.61), ("e2", 0.4)), "e1")
    assert got.conversation_key == key_of("c1") and np.allclose(got.vector, vec(3))
    assert got.best_score == pytest.approx(0.61) and got.feedback == NO_FEEDBACK
    unanswered = qlog.read("kb", unanswered=True)
    assert [q.request_id for q in unanswered] == [f"{n:032x}" for n in (4, 2, 0)]  # newest first
    assert len(qlog.read("kb", limit=2)) == 2


def test_feedback_is_stored_on_its_row_and_a_later_one_replaces_it(qlog):
    qlog.add(row(1, outcome=ANSWERED))  # still queued: Feedback flushes first
    q = qlog.feedback(["kb"], Feedback(f"{1:032x}", False, "e2", "wrong card"), has_entry)
    assert (q.feedback, q.feedback_entry, q.comment) == (NOT_HELPFUL, "e2", "wrong card")
    stored = qlog.get(["kb"], f"{1:032x}")
    assert (stored.feedback, stored.feedback_entry, stored.comment) == (
        NOT_HELPFUL, "e2", "wrong card")
    assert stored.feedback_at > 0 and stored.text == "question 1" and qlog.count("kb") == 1
    qlog.feedback(["kb"], Feedback(f"{1:032x}", True), has_entry)
    again = qlog.get(["kb"], f"{1:032x}")
    assert (again.feedback, again.feedback_entry, again.comment) == (HELPFUL, "", "")
    assert [q.request_id for q in qlog.read("kb", unanswered=True)] == [f"{1:032x}"]


def test_feedback_on_an_unknown_request_or_entry_is_refused(qlog):
    qlog.add(row(1))
    qlog.flush()
    with pytest.raises(NotFound, match=r"not in the question log .*'kb'"):
        qlog.feedback(["kb"], Feedback(f"{2:032x}", True), has_entry)
    with pytest.raises(NotFound):  # a knowledge base without a log: nothing to find
        qlog.feedback(["nolog"], Feedback(f"{1:032x}", True), has_entry)
    with pytest.raises(InvalidInput, match="'nope' is not in knowledge base 'kb'"):
        qlog.feedback(["kb"], Feedback(f"{1:032x}", False, "nope"), has_entry)
    assert qlog.get(["kb"], f"{1:032x}").feedback == NO_FEEDBACK


def test_forget_deletes_one_conversations_rows_everywhere(qlog):
    for n in range(4):
        qlog.add(row(n, conversation="alice" if n < 3 else "bob"))
    qlog.add(row(7, "other", conversation="alice"))
    qlog.add(row(8))  # no conversation
    assert qlog.forget("alice") == 4  # queued rows are written, then deleted
    assert [q.request_id for q in qlog.read("kb")] == [f"{n:032x}" for n in (8, 3)]
    assert qlog.count("other") == 0
    assert qlog.forget("alice") == 0
    assert qlog.forget("bob", ["other"]) == 0 and qlog.forget("bob", ["kb"]) == 1


def test_prune_drops_rows_past_the_days_and_the_oldest_past_max_rows(store):
    qlog = QuestionLog(store.client, DIM, uri=store.uri, days=1, max_rows=3)
    now = time.time()
    for n in range(3):
        qlog.add(row(n, at=now - 2 * 86400))  # two days old
    for n in range(3, 8):
        qlog.add(row(n, at=now - 60 * (10 - n)))  # minutes old, oldest first
    qlog.flush()
    assert qlog.prune(now) == 3 + 2
    assert sorted(q.request_id for q in qlog.read("kb")) == [f"{n:032x}" for n in (5, 6, 7)]
    assert qlog.prune(now) == 0
    assert qlog.read("kb", since=now - 60 * 4) == qlog.read("kb")[:2]


class FailingClient:
    """A Milvus client whose writes fail, as when Milvus is down."""

    def __init__(self, client, fail: bool = True) -> None:
        self._client, self.fail = client, fail

    def __getattr__(self, name):
        fn = getattr(self._client, name)
        if name == "upsert":
            def upsert(*a, **kw):
                if self.fail:
                    raise ConnectionError("Milvus is down")
                return fn(*a, **kw)
            return upsert
        return fn


def test_a_failed_write_is_counted_and_retried_never_raised(store, caplog):
    client = FailingClient(store.client)
    qlog = QuestionLog(client, DIM, uri=store.uri, days=30, max_rows=1000)
    qlog.add(row(1))
    qlog.add(row(2))
    assert qlog.flush() == 0  # no exception
    assert (qlog.failed, qlog.dropped, qlog.pending) == (2, 0, 2)
    assert "2 rows not written, 2 queued again: Milvus is down" in caplog.text
    client.fail = False
    assert qlog.flush() == 2 and qlog.count("kb") == 2 and qlog.written == 2
    client.fail = True
    qlog.add(row(3))
    for _ in range(MAX_TRIES):
        qlog.flush()
    assert (qlog.failed, qlog.dropped, qlog.pending) == (2 + MAX_TRIES, 1, 0)


def test_the_log_has_its_own_collection_beside_the_knowledge_bases(store, qlog):
    qlog.add(row(1, "faq"))
    qlog.flush()
    assert questions_name("faq") in store.client.list_collections()
    assert store.knowledge_bases() == []  # the log is no knowledge base
