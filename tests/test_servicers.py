"""Servicers over a fake pipeline: the error table, health before loading, API keys."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from supportqa.client import AsyncSupportClient, SupportQAError
from supportqa.v1 import supportqa_pb2 as pb
from supportqa_server.answering import pipeline as p
from supportqa_server.api.server import create_server
from supportqa_server.errors import Cancelled, NotFound, Overloaded, TooLarge, WrongModel
from supportqa_server.knowledge.store import EntryData
from supportqa_server.runtime.settings import Settings


class FakePipeline:
    """Answers from a script: the question text names what to do."""

    def __init__(self) -> None:
        self.components = []
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        pass

    async def ask(self, req: p.AskRequest):
        failures = {
            "overload": Overloaded("the text encoder queue is full"),
            "late": Cancelled("the deadline passed"),
            "big": TooLarge("too big"),
            "missing": NotFound("knowledge base 'x' does not exist"),
            "bug": KeyError("secret internal detail"),
            "model": WrongModel("knowledge base 'x' was written with 384-d text vectors"),
        }
        yield p.Accepted("rid")
        if req.text in failures:
            raise failures[req.text]
        yield p.Answer(1, EntryData(id="e", answer="A", title="T"), 0.9, ("dense",), "t")
        yield p.Done(p.Timings(total_us=5))


@pytest.fixture
async def fake_server():
    settings = Settings(port=0, api_keys=["s3cret"])
    app, port = create_server(settings, FakePipeline())
    await app.server.start()
    yield app, f"127.0.0.1:{port}"
    await app.stop(0)


async def test_health_is_not_serving_until_loaded(fake_server):
    app, target = fake_server
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        before = await stub.Check(health_pb2.HealthCheckRequest())
        assert before.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await app.load()
        after = await stub.Check(health_pb2.HealthCheckRequest())
        assert after.status == health_pb2.HealthCheckResponse.SERVING


async def test_missing_or_wrong_api_key_is_unauthenticated(fake_server):
    _, target = fake_server
    for key in (None, "wrong"):
        async with AsyncSupportClient(target, api_key=key) as c:
            with pytest.raises(SupportQAError) as e:
                await c.ask("hello")
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in e.value.details
            with pytest.raises(SupportQAError) as e:
                async for _ in c.ask_stream("hello"):
                    pass
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncSupportClient(target, api_key="s3cret") as c:
        r = await c.ask("hello")
        assert r.answers[0].entry_id == "e" and r.request_id == "rid"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("overload", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("late", grpc.StatusCode.DEADLINE_EXCEEDED),
        ("big", grpc.StatusCode.INVALID_ARGUMENT),
        ("missing", grpc.StatusCode.NOT_FOUND),
        ("bug", grpc.StatusCode.INTERNAL),
        ("model", grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_error_table(fake_server, text, code):
    _, target = fake_server
    async with AsyncSupportClient(target, api_key="s3cret", retries=0) as c:
        with pytest.raises(SupportQAError) as e:
            await c.ask(text)
        assert e.value.code == code
        if code == grpc.StatusCode.INTERNAL:
            assert "secret internal detail" not in e.value.details
        events = []
        with pytest.raises(SupportQAError) as e:
            async for ev in c.ask_stream(text):
                events.append(ev)
        assert e.value.code == code
        assert [type(x) for x in events] == [pb.Accepted]
        r = await c.ask("fine")  # the server keeps serving
        assert r.answers[0].answer == "A"


async def test_retries_only_unavailable():
    async with AsyncSupportClient("127.0.0.1:1", retries=2, backoff=0.01, timeout=2) as c:
        with pytest.raises(SupportQAError) as e:
            await c.stats()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert e.value.retriable


def test_status_messages_are_capped_below_grpcs_metadata_limit():
    from supportqa_server.api.status import MAX_DETAILS, status_of
    from supportqa_server.errors import InvalidInput

    code, msg = status_of(InvalidInput("x" * 20_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(msg) <= MAX_DETAILS + 3 and msg.endswith("...")
    assert status_of(InvalidInput("short"))[1] == "short"


class RecordingPipeline(FakePipeline):
    """A FakePipeline whose searches and finished questions are seen as the question log sees
    them (answering/traffic.py): the servicer's trip, filled by the events and the search."""

    def __init__(self) -> None:
        super().__init__()
        self.traffic, self.trips = self, []

    def record(self, trip) -> None:
        import copy

        self.trips.append(copy.copy(trip))  # as Traffic.record, read now: the next turn reuses it

    async def ask(self, req: p.AskRequest):
        import asyncio

        from supportqa_server.answering import traffic

        async def search():  # the search runs in tasks of the call, as answer_accepted's
            traffic.searched(req.text.strip(), 1.0, np.ones(2, np.float32))

        async for ev in super().ask(req):
            if isinstance(ev, p.Accepted):
                await asyncio.gather(search())
            yield ev

    async def converse(self, messages, timeout):
        from supportqa_server.answering import traffic

        async for m in messages:
            if isinstance(m, p.EndOfUtterance):
                break
        yield p.Accepted("cid")
        yield p.Transcript("my card is lost", "en", True)
        traffic.searched("my card is lost", 1.0, np.zeros(2, np.float32))
        yield p.NoAnswer("no confident answer", 0.2, 0.5)
        yield p.Done(p.Timings())
        yield p.Accepted("cid2")  # a whole call's next turn
        yield p.Transcript("and my pin", "en", True)
        traffic.searched("and my pin", 1.0, np.ones(2, np.float32))
        traffic.searched("my card is lost and my pin", 1.0, np.ones(2, np.float32))
        yield p.Answer(1, EntryData(id="pin", answer="A", title="T"), 0.8, ("dense",), "t")
        yield p.Done(p.Timings())


async def test_each_answered_question_reaches_the_question_log_with_its_conversation():
    pipeline = RecordingPipeline()
    app, port = create_server(Settings(port=0), pipeline)
    await app.server.start()
    try:
        async with AsyncSupportClient(f"127.0.0.1:{port}", retries=0) as c:
            await c.ask(" card lost ", knowledge_base="kb", metadata={"conversation_id": "c-1"})
            [ev async for ev in c.ask_stream("card lost")]
            with pytest.raises(SupportQAError):
                await c.ask("overload")  # failed: not logged
            config = pb.ConverseConfig(question=pb.Question(
                knowledge_base="kb", metadata={"conversation_id": "call-7"}))
            [ev async for ev in c.converse([pb.ConverseRequest(config=config),
                                           pb.ConverseRequest(audio_chunk=b"\0\0"),
                                           pb.ConverseRequest(end=pb.EndOfUtterance())])]
    finally:
        await app.stop(0)
    typed, streamed, spoken, follow_up = pipeline.trips
    assert (typed.knowledge_base, typed.text, typed.conversation_id, typed.request_id) == (
        "kb", "card lost", "c-1", "rid")
    assert typed.done and typed.outcome == "answered" and typed.top == [("e", 0.9)]
    assert typed.question()[0] == "card lost" and typed.question()[1].tolist() == [1.0, 1.0]
    assert (streamed.knowledge_base, streamed.conversation_id, streamed.done) == (
        "default", "", True)
    assert (spoken.knowledge_base, spoken.conversation_id, spoken.request_id) == (
        "kb", "call-7", "cid")
    assert spoken.outcome == "no_answer" and spoken.question()[0] == "my card is lost"
    assert (follow_up.conversation_id, follow_up.request_id, follow_up.outcome) == (
        "call-7", "cid2", "answered")
    assert follow_up.top == [("pin", 0.8)] and follow_up.question()[0] == "and my pin"
