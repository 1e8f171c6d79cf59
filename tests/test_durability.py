"""A write the server acknowledged survives the server process being killed (SIGKILL: the OOM
killer, a crashed host agent), with the real `supportqa-server` and its Milvus Lite."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from supportqa import SupportClient
from supportqa.v1 import supportqa_pb2 as pb

pytestmark = pytest.mark.slow

SERVER = Path(sys.executable).with_name("supportqa-server")
START_TIMEOUT_S = 120.0  # model load and Milvus start; ~5 s on the 2-core machine


def start(data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Starts a text-only server on a free port; returns it and its address once SERVING."""
    env = dict(os.environ, SUPPORTQA_SPEECH_MODEL="", SUPPORTQA_OCR="false",
               SUPPORTQA_CLIP_MODEL="", HF_HUB_OFFLINE="1")
    offset = log.stat().st_size if log.exists() else 0
    proc = subprocess.Popen(
        [str(SERVER), "serve", "--port", "0", "--data-dir", str(data_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"), start_new_session=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.search(r"SERVING on [\d.]+:(\d+)", log.read_text()[offset:])
        if found:
            return proc, f"localhost:{found.group(1)}"
        assert proc.poll() is None, f"server exited:\n{log.read_text()[offset:]}"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"server not SERVING after {START_TIMEOUT_S} s")


def test_acknowledged_writes_survive_the_server_being_killed(tmp_path):
    data, log = tmp_path / "data", tmp_path / "server.log"
    entries = [pb.Entry(id=f"e{i}", answer=f"Answer {i}.", questions=[f"question number {i}"])
               for i in range(20)]
    proc, target = start(data, log)
    try:
        with SupportClient(target, timeout=30) as client:
            assert client.upsert(entries).written == 20
            # A replacement: after the crash the new version must be whole, the old one gone.
            client.upsert([pb.Entry(id="e3", answer="Answer 3, replaced.",
                                    questions=["the replaced third question"])])
        os.kill(proc.pid, signal.SIGKILL)  # the server process only, no shutdown of any kind
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    proc, target = start(data, log)
    try:
        with SupportClient(target, timeout=30) as client:
            kb = client.stats().knowledge_bases[0]
            assert (kb.name, kb.entries) == ("default", 20)
            assert kb.rows == 40  # each entry: its paraphrase and its answer
            for i in range(20):
                assert client.get(f"e{i}").answer.startswith(f"Answer {i}")
            assert client.get("e3").answer == "Answer 3, replaced."
            assert client.ask("question number 7", top_k=1).answers[0].entry_id == "e7"
            r = client.ask("the replaced third question", top_k=1, min_score=0.0)
            assert r.answers[0].entry_id == "e3"
            assert r.answers[0].matched_text == "the replaced third question"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
