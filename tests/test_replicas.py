"""Two replicas on one real Milvus server, of both kinds a team may run: the Milvus 2.3.5
standalone server (PyPI `milvus`, no BM25) and milvus-lite 3.2.2's network server (BM25), each
installed into a venv of its own under the cache folder. Each replica sees the other's writes,
tag filters work, and a Milvus outage is UNAVAILABLE and NOT_SERVING until Milvus is back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from supportqa_tools.milvus_server import KINDS, Milvus

pytestmark = [pytest.mark.slow, pytest.mark.milvus_server]

SEEN_WITHIN_S = 5.0  # a write through one replica is answered by the other within this


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
