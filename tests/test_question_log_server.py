"""The question log on a real Milvus server (standalone 2.3.5, milvus-lite 3.2.2's server mode),
shared by two replicas: one replica's questions are found by the other's Feedback, even while
still queued there, and deleted by its DeleteQuestions."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from supportqa_server.knowledge.entries import key_of
from supportqa_server.knowledge.questions import (
    NOT_HELPFUL,
    Feedback,
    LoggedQuestion,
    QuestionLog,
)
from supportqa_server.knowledge.store import KnowledgeStore
from supportqa_tools.milvus_server import KINDS, Milvus

pytestmark = [pytest.mark.slow, pytest.mark.milvus_server]
DIM = 8


@pytest.fixture(params=list(KINDS), scope="module")
def server(request, tmp_path_factory):
    m = Milvus(request.param, tmp_path_factory.mktemp("milvus"))
    m.start()
    yield m
    m.kill()


def replica(uri: str) -> tuple[KnowledgeStore, QuestionLog]:
    store = KnowledgeStore(uri, DIM)
    store.open()
    return store, QuestionLog(store.client, DIM, uri=uri, days=30, max_rows=3)


def row(n: int, conversation: str = "") -> LoggedQuestion:
    v = np.zeros(DIM, np.float32)
    v[n % DIM] = 1.0
    return LoggedQuestion(f"{n:032x}", "kb", f"question {n}", v, "no_answer",
                          time.time() - 100 + n,
                          conversation_key=key_of(conversation) if conversation else "")


def test_two_replicas_share_the_question_log(server):
    (sa, a), (sb, b) = replica(server.uri), replica(server.uri)
    try:
        a.add(row(1, "c1"))
        a.add(row(2, "c1"))
        assert a.flush() == 2
        assert a.shared and b.knowledge_bases() == ["kb"] and b.count("kb") == 2
        q = b.feedback(["kb"], Feedback(f"{1:032x}", False), lambda kb, e: True)
        assert a.get(["kb"], f"{1:032x}").feedback == NOT_HELPFUL == q.feedback
        a.add(row(3, "c1"))  # still queued on A when B's Feedback looks for it
        threading.Timer(0.5, a.flush).start()
        t0 = time.monotonic()
        assert b.feedback(["kb"], Feedback(f"{3:032x}", True), lambda kb, e: True)
        assert time.monotonic() - t0 < 3.0
        b.add(row(4))
        b.add(row(5))
        assert b.forget("c1") == 3 and a.count("kb") == 2  # B's own queue written first
        a.add(row(6))
        a.add(row(7))
        a.flush()
        assert b.prune() == 1  # max_rows 3: the oldest of 4 goes
        assert sorted(q.request_id for q in a.read("kb")) == [f"{n:032x}" for n in (5, 6, 7)]
    finally:
        sa.close()
        sb.close()
