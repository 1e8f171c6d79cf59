"""The server process: one server per data folder, and SIGTERM stops it in every state."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from test_durability import SERVER, start

pytestmark = pytest.mark.slow

ENV = dict(os.environ, SUPPORTQA_SPEECH_MODEL="", SUPPORTQA_OCR="false", HF_HUB_OFFLINE="1")


def test_a_second_server_on_a_data_folder_says_it_is_in_use(tmp_path):
    data, log = tmp_path / "data", tmp_path / "server.log"
    first, _ = start(data, log)
    try:
        second = subprocess.run(
            [str(SERVER), "serve", "--port", "0", "--data-dir", str(data)],
            env=ENV, capture_output=True, text=True, timeout=300,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"data folder {data} is in use by another process (pid {first.pid})" in (
            second.stderr)
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0


def test_sigterm_during_start_up_stops_the_server(tmp_path):
    """A signal while the models load ends the process; nothing of it lingers (its Milvus
    Lite included) and the folder starts again."""
    data, log = tmp_path / "data", tmp_path / "server.log"
    proc = subprocess.Popen(
        [str(SERVER), "serve", "--port", "0", "--data-dir", str(data)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while "listening on" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "SERVING on" not in log.read_text(), "started before the signal: nothing tested"
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code in (128 + signal.SIGTERM, -signal.SIGTERM), log.read_text()[-2000:]
    again, _ = start(data, log)
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=60) == 0


def test_sigterm_lets_calls_in_flight_finish_then_exits_0(tmp_path, monkeypatch):
    """SIGTERM while an Upsert streams: it completes, acknowledged, within the grace period,
    and the process exits 0 (what `docker stop` relies on). The grace period is long here so
    that a slow machine does not cut the call short."""
    import threading

    from supportqa.client import SupportClient
    from supportqa.v1 import supportqa_pb2 as pb

    monkeypatch.setenv("SUPPORTQA_GRACE_SECONDS", "120")
    data, log = tmp_path / "data", tmp_path / "server.log"
    proc, target = start(data, log)
    entries = [pb.Entry(id=f"e{i}", answer=f"Answer {i}.",
                        questions=[f"how do I do thing number {i}"]) for i in range(150)]
    result: dict = {}
    streaming = threading.Event()

    def stream():
        for i, e in enumerate(entries):
            if i == 70:
                streaming.set()  # gRPC is sending the stream: the call is in flight
            yield e

    def write() -> None:
        with SupportClient(target, timeout=60, retries=0) as client:
            result["summary"] = client.upsert(stream())

    writer = threading.Thread(target=write)
    try:
        writer.start()
        assert streaming.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
        writer.join(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, log.read_text()[-2000:]
    assert "shutting down: draining" in log.read_text()
    assert result["summary"].written == 150, log.read_text()[-2000:]
