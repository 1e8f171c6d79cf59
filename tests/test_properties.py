"""Property-based: whatever messages callers send to every RPC, a real server over a real Milvus
Lite never answers INTERNAL or UNKNOWN, every acknowledged write reads back, and after a
restart the data folder serves the same content. Hypothesis runs derandomized (a fixed seed) with
a small example budget, so CI sees the same calls every time."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supportqa import SupportClient, SupportQAError
from supportqa.v1 import supportqa_pb2 as pb
from test_durability import start

pytestmark = pytest.mark.slow

CRAFTED = [
    "x') OR ('1'='1", 'x") or ("1"=="1', "a','b", "can't-login", 'say "hi"', "line\nbreak",
    "back\\slash\\", "emoji 🙂", 'entry_id > "z', "%", "_", "]) or true or ([", "a\x1fb", "\x00",
]
KBS = ["default", "kb_1", "Other", "bad name", "", "x" * 65, "ü"]

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
ids = st.one_of(st.sampled_from(CRAFTED), text, st.text(max_size=3, alphabet="ab'\"\\\n"))
kbs = st.sampled_from(KBS)
entries = st.builds(
    pb.Entry, knowledge_base=kbs, id=ids, title=text, answer=st.one_of(text, st.just("An answer.")),
    questions=st.lists(text, max_size=3), tags=st.lists(st.one_of(ids, text), max_size=3),
    locale=st.one_of(st.just(""), text), url=text,
)
calls = st.one_of(
    st.tuples(st.just("upsert"), st.lists(entries, min_size=1, max_size=4)),
    st.tuples(st.just("delete"), kbs, st.lists(ids, max_size=3)),
    st.tuples(st.just("get"), kbs, ids),
    st.tuples(st.just("stats"), kbs),
    st.tuples(st.just("ask"), st.builds(
        pb.Question, knowledge_base=kbs, text=text, top_k=st.integers(-3, 60),
        min_score=st.one_of(st.none(), st.floats(-1, 2, allow_nan=False)),
        locale=st.one_of(st.just(""), text), tags=st.lists(st.one_of(ids, text), max_size=3),
        language=st.one_of(st.just(""), text),
    )),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz") / "data"
    log = data.parent / "server.log"
    state = {"data": data, "log": log}
    state["proc"], state["target"] = start(data, log)
    yield state
    os.killpg(state["proc"].pid, signal.SIGKILL)


def _apply(client: SupportClient, call, stored: dict) -> None:
    """Runs one call; records in ``stored`` what the server acknowledged writing."""
    kind = call[0]
    try:
        if kind == "upsert":
            written = call[1]
            try:
                client.upsert(call[1])
            except SupportQAError as e:
                assert e.summary is not None, e
                failed = e.summary.failures[0].index if e.summary.failures else 0
                written = call[1][:failed]
                raise
            finally:
                for msg in written:
                    stored[(msg.knowledge_base or "default", msg.id)] = msg
        elif kind == "delete":
            client.delete(call[2], knowledge_base=call[1])
            for i in call[2]:
                stored.pop((call[1] or "default", i), None)
        elif kind == "get":
            client.get(call[2], knowledge_base=call[1])
        elif kind == "stats":
            client.stats(call[1])
        else:
            client._call(client._answering.Ask, call[1], None)  # the raw message, as sent
    except SupportQAError as e:
        assert e.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (call, e)


def _check(client: SupportClient, stored: dict) -> None:
    for (kb, entry_id), msg in stored.items():
        got = client.get(entry_id, knowledge_base=kb)
        assert (got.id, got.answer, got.title, list(got.questions)) == (
            msg.id, msg.answer, msg.title, list(msg.questions)), (kb, entry_id)
        assert list(got.tags) == [t for t in msg.tags if t]
    for kb in {kb for kb, _ in stored}:
        n = sum(1 for k, _ in stored if k == kb)
        assert client.stats(kb).knowledge_bases[0].entries == n, kb


STORED: dict = {}  # every acknowledged write of the run, across examples


@settings(max_examples=40, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(calls, min_size=1, max_size=6))
def test_any_calls_give_a_precise_status_and_keep_what_was_acknowledged(server, batch):
    with SupportClient(server["target"], timeout=60) as client:
        for call in batch:
            _apply(client, call, STORED)
        _check(client, STORED)


def test_a_restart_serves_what_was_acknowledged(server):
    """Runs after the fuzz above (same module, file order): the folder starts again and holds
    exactly the acknowledged content."""
    assert STORED, "the fuzz wrote nothing: the strategies are broken"
    os.kill(server["proc"].pid, signal.SIGTERM)
    server["proc"].wait(timeout=60)
    server["proc"], server["target"] = start(server["data"], server["log"])
    with SupportClient(server["target"], timeout=60) as client:
        _check(client, STORED)


def test_crafted_ids_round_trip_through_the_api(server):
    """Each crafted id beside ordinary entries: written, read, deleted alone."""
    kb = "crafted"
    plain = [pb.Entry(knowledge_base=kb, id=i, answer=f"Plain {i}.") for i in ("a", "b", "1")]
    crafted = [pb.Entry(knowledge_base=kb, id=i, answer=f"Crafted {n}.", tags=[i])
               for n, i in enumerate(CRAFTED)]
    with SupportClient(server["target"], timeout=60) as client:
        assert client.upsert(plain + crafted).written == len(plain) + len(crafted)
        assert client.delete(["a','b", "x') OR ('1'='1"], knowledge_base=kb).deleted == 2
        left = [e for e in plain + crafted if e.id not in ("a','b", "x') OR ('1'='1")]
        for e in left:
            assert client.get(e.id, knowledge_base=kb).answer == e.answer
        assert client.stats(kb).knowledge_bases[0].entries == len(left)


def test_bad_line_in_an_ingest_file_writes_nothing(server, tmp_path):
    """serve --ingest with one invalid line exits naming FILE:LINE, and writes nothing."""
    kb_file = tmp_path / "kb.jsonl"
    lines = [f'{{"knowledge_base": "ingest", "id": "e{i}", "answer": "A {i}."}}'
             for i in range(300)]
    lines[150] = '{"knowledge_base": "ingest", "id": "e150"}'  # no answer: line 151
    lines.append('{"knowledge_base": "ingest", "id": "e7", "answer": "again"}')  # line 301
    kb_file.write_text("\n".join(lines) + "\n")
    os.kill(server["proc"].pid, signal.SIGTERM)
    server["proc"].wait(timeout=60)
    env = dict(os.environ, SUPPORTQA_SPEECH_MODEL="", SUPPORTQA_OCR="false", HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [str(Path(server["proc"].args[0])), "serve", "--port", "0", "--data-dir",
         str(server["data"]), "--ingest", str(kb_file)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"{kb_file}:151:" in run.stderr and "has no answer" in run.stderr
    assert f"{kb_file}:301: id 'e7' is already used on line 8" in run.stderr
    server["proc"], server["target"] = start(server["data"], server["log"])
    with SupportClient(server["target"], timeout=60) as client:
        with pytest.raises(SupportQAError) as e:
            client.stats("ingest")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
