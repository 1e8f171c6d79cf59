"""SUPPORTQA_TRACING: a span per RPC, and under it one span per stage of the question."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


async def test_a_question_makes_an_rpc_span_with_a_span_per_stage(tmp_path):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from supportqa.client import AsyncSupportClient
    from supportqa_server.api.server import running_server
    from supportqa_server.runtime.settings import Settings

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    settings = Settings(port=0, data_dir=tmp_path, speech_model="", ocr=False, clip_model="",
                        tracing=True, head_weight=0.0, head_weight_voice=0.0)
    async with running_server(settings) as target:
        async with AsyncSupportClient(target) as c:
            await c.upsert([{"id": "lost", "answer": "Freeze it.",
                             "questions": ["I lost my card"]}])
            exporter.clear()
            await c.ask("I lost my card")
    spans = exporter.get_finished_spans()
    (rpc,) = [s for s in spans if s.name == "/supportqa.v1.Answering/Ask"]
    stages = {s.name: s for s in spans if s.name.startswith("supportqa.")}
    assert {"supportqa.embed", "supportqa.search", "supportqa.rank"} <= set(stages)
    for s in stages.values():
        assert s.parent is not None and s.parent.span_id == rpc.context.span_id
        assert rpc.start_time <= s.start_time <= s.end_time <= rpc.end_time + 10**6
