"""Two replicas on one real Milvus server, of both kinds a team may run: the Milvus 2.3.5
standalone server (PyPI `milvus`, no BM25) and milvus-lite 3.2.2's network server (BM25), each
installed into a venv of its own under the cache folder. Each replica sees the other's writes,
tag filters work, and a Milvus outage is UNAVAILABLE and NOT_SERVING until Milvus is back."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.milvus_server]

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "supportqa"
# kind -> (what pip installs, its venv, launcher, routes the store serves on it)
KINDS = {
    "standalone-2.3.5": (["milvus==2.3.5"], CACHE / "milvus-2.3.5", "milvus-server",
                         "routes: dense"),
    "lite-3.2.2": (["milvus-lite==3.2.2", "pymilvus"], CACHE / "milvus-lite-3.2.2",
                   "milvus-lite", "routes: dense, lexical"),
}
SEEN_WITHIN_S = 5.0  # a write through one replica is answered by the other within this
PORT_FLAGS = ("--proxy-port", "--etcd-port", "--root-coord-port", "--proxy-internal-port",
              "--query-coord-port", "--query-node-port", "--index-coord-port",
              "--index-node-port", "--data-coord-port", "--data-node-port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(kind: str) -> Path:
    """The server's launcher, installed from PyPI into its own venv on first use."""
    packages, venv, launcher, _ = KINDS[kind]
    exe = venv / "bin" / launcher
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *packages], check=True,
                       timeout=900)
    return exe


class Milvus:
    """A Milvus standalone server on loopback ports of its own, which tests stop and start."""

    def __init__(self, kind: str, data: Path) -> None:
        self.kind, self.data, self.exe = kind, data, _launcher(kind)
        self.routes = KINDS[kind][3]
        if kind.startswith("lite"):
            self.ports = {"--port": _free_port()}
            self.uri = f"http://127.0.0.1:{self.ports['--port']}"
        else:
            self.ports = {flag: _free_port() for flag in PORT_FLAGS}
            self.uri = f"http://127.0.0.1:{self.ports['--proxy-port']}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 420.0) -> None:
        """Starts the server and waits until it answers. Started again on its data, Milvus
        2.3 first waits for its previous session in etcd to lapse: minutes on a busy
        machine."""
        self._wait_for_ports()
        args = ([str(self.exe), "server", "--data-dir", str(self.data), "--host", "127.0.0.1"]
                if self.kind.startswith("lite") else [str(self.exe), "--data", str(self.data)])
        for flag, port in self.ports.items():
            args += [flag, str(port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        from pymilvus import MilvusClient

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                MilvusClient(uri=self.uri, timeout=5).list_collections(timeout=5)
                return
            except Exception:  # noqa: BLE001 - not up yet
                assert self.proc.poll() is None, "milvus-server exited"
                time.sleep(1)
        raise AssertionError(f"Milvus not up on {self.uri} after {timeout_s} s")

    def _wait_for_ports(self, timeout_s: float = 120.0) -> None:
        """Waits until every port binds as the launcher binds it (no SO_REUSEADDR): after a
        stop, the proxy port's connections linger in TIME_WAIT for up to a minute, and a
        launcher that cannot bind a port it was given fails or moves."""
        deadline = time.monotonic() + timeout_s
        for port in self.ports.values():
            while True:
                with socket.socket() as s:
                    try:
                        s.bind(("127.0.0.1", port))
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                time.sleep(1)

    def kill(self) -> None:
        """Stops the server: SIGTERM, then SIGKILL if it hangs (it may: FACTS.md). After a
        bare SIGKILL it took minutes to come back, or came back on another port."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=60)
        self.proc = None
        # The launcher runs Milvus (copied under its data folder) in a session of its own,
        # which outlives it: stop that too, or it keeps Milvus's fixed ports (2379, 9091).
        for sig, wait_s in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 10.0)):
            pids = self._server_pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while self._server_pids() and time.monotonic() < deadline:
                time.sleep(0.5)

    def _server_pids(self) -> list[int]:
        """Processes running the Milvus binary under this server's data folder."""
        binary = str(self.data / "bin" / "milvus").encode()
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(binary):
                    pids.append(int(proc.name))
            except OSError:
                continue  # gone meanwhile
        return pids


@pytest.fixture(params=list(KINDS))
def milvus(request, tmp_path_factory):
    """A fresh server per test: the outage test stops and starts its own."""
    server = Milvus(request.param, tmp_path_factory.mktemp("milvus"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _settings(tmp_path: Path, name: str, uri: str, **overrides):
    from supportqa_server.runtime.settings import Settings

    # Default settings but the Milvus URI (and a free port, a folder of its own).
    return Settings(port=0, data_dir=tmp_path / name, milvus_uri=uri, **overrides)


async def _until(check, timeout_s: float):
    """Polls an async check until it returns a true value; returns it (or the last one). A
    call that fails (NOT_FOUND before a replica catches up) counts as false."""
    from supportqa.client import SupportQAError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = await check()
        except SupportQAError:
            got = False
        if got or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.2)


def _top(result) -> str:
    return result.answers[0].entry_id if result.answers else ""


async def test_two_replicas_share_one_milvus(milvus, tmp_path):
    from supportqa.client import AsyncSupportClient
    from supportqa_server.api.server import running_server

    lost = {"id": "lost", "answer": "Freeze the card in the app.", "tags": ["cards"],
            "questions": ["I lost my card", "my card is gone"]}
    hours = {"id": "hours", "answer": "We are open 24/7 in the app.",
             "questions": ["when are you open", "opening hours"]}
    async with (running_server(_settings(tmp_path, "a", milvus.uri)) as a_target,
                running_server(_settings(tmp_path, "b", milvus.uri)) as b_target,
                AsyncSupportClient(a_target, retries=0) as a,
                AsyncSupportClient(b_target, retries=0) as b):
        store = next(c for c in (await b.stats()).components if c.name == "store")
        assert store.detail.endswith(milvus.routes)  # no BM25 function before Milvus 2.5

        await a.upsert([lost, hours])

        async def b_answers_lost():
            return _top(await b.ask("I lost my card")) == "lost"

        assert await _until(b_answers_lost, SEEN_WITHIN_S), "B never saw A's new entry"
        # Tag filters (ARRAY keys, array_contains_any) on Milvus 2.3.
        assert _top(await b.ask("I lost my card", tags=["cards"])) == "lost"
        tagged = await b.ask("when are you open", tags=["cards"], min_score=0.0)
        assert all(x.entry_id == "lost" for x in tagged.answers)

        # A re-upsert of an unchanged entry through A never hides it from B.
        await a.upsert([lost])
        for _ in range(int(SEEN_WITHIN_S / 0.25)):
            assert _top(await b.ask("I lost my card")) == "lost"
            await asyncio.sleep(0.25)

        # A knowledge base made through A is answered through B.
        await a.upsert([{**hours, "knowledge_base": "other"}])

        async def b_answers_other():
            return _top(await b.ask("opening hours", knowledge_base="other")) == "hours"

        assert await _until(b_answers_other, SEEN_WITHIN_S), "B never saw A's knowledge base"

        # Concurrent upserts of one id through both replicas end in one complete version.
        for round_ in range(5):
            await asyncio.gather(
                a.upsert([{**lost, "answer": f"A's answer {round_}."}]),
                b.upsert([{**lost, "answer": f"B's answer {round_}."}]),
            )

        async def agree():
            ea, eb = await a.get("lost"), await b.get("lost")
            return ea.answer == eb.answer and ea.answer

        final = await _until(agree, SEEN_WITHIN_S)
        assert final and final.endswith("answer 4."), final
        for client in (a, b):  # whole: its rows are searchable on both
            answers = (await client.ask("my card is gone")).answers
            assert answers[0].entry_id == "lost" and answers[0].answer == final

        # One replica's latency at concurrency 1, for the record (not asserted).
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            await b.ask("I lost my card")
            times.append((time.perf_counter() - t0) * 1000)
        print(f"\nAsk through replica B on {milvus.kind}, c=1: p50 {sorted(times)[10]:.1f} ms")


async def _health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return -1
        return reply.status


async def test_a_milvus_outage_is_unavailable_then_recovers_without_a_restart(milvus, tmp_path):
    from supportqa.client import AsyncSupportClient, SupportQAError
    from supportqa_server.api.server import running_server

    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    entry = {"id": "pin", "answer": "Reset it in the app.", "questions": ["reset my PIN"],
             "knowledge_base": "outage"}
    quick = {"speech_model": "", "ocr": False}  # voice and OCR play no part here
    async with (running_server(_settings(tmp_path, "a", milvus.uri, **quick)) as a_target,
                running_server(_settings(tmp_path, "b", milvus.uri, **quick)) as b_target,
                AsyncSupportClient(a_target, retries=0, timeout=60) as a,
                AsyncSupportClient(b_target, retries=0, timeout=60) as b):
        await a.upsert([entry])
        await asyncio.to_thread(milvus.kill)
        with pytest.raises(SupportQAError) as e:
            await a.ask("reset my PIN", knowledge_base="outage")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value
        assert "retry" in e.value.details

        async def both(status):
            return all([await _health(t) == status for t in (a_target, b_target)])

        # A poll caught mid-call (a scan, a delayed delete) gives up only after its own
        # timeout (CALL_TIMEOUT_S, 30 s), so allow for one of those.
        assert await _until(lambda: both(not_serving), 90), "health stayed SERVING"
        await asyncio.to_thread(milvus.start)
        assert await _until(lambda: both(serving), 120), "health never SERVING again"
        for client in (a, b):
            assert _top(await client.ask("reset my PIN", knowledge_base="outage")) == "pin"
