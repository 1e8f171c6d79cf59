"""Optional OpenTelemetry tracing (the `tracing` extra): a server span per RPC from
opentelemetry-instrumentation-grpc, and under it one span per stage of a question."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)



def instrument() -> None:
    """Instruments grpc.aio servers made from now on; without a tracer provider of the
    application's own, sets one that exports over OTLP as the OTEL_* variables say.

    Raises:
        ImportError: the `tracing` extra is not installed.
    """
    from opentelemetry import trace
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer

    if type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider()
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("tracing: no exporter installed (pip install "
                        "opentelemetry-exporter-otlp); spans are made but not sent")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    GrpcAioInstrumentorServer().instrument()


def stage_spans(timings_ms: dict[str, float], started: float) -> None:
    """One child span of the current (RPC) span per stage that took time, laid end to end
    from the call's start (the timings are durations, measured where each stage ran).

    Args:
        timings_ms: Stage -> milliseconds in the order of the trip, as the request log has
            them (Timings' field order).
        started: time.time() when the call started.
    """
    from opentelemetry import trace

    tracer = trace.get_tracer("supportqa")
    at = int(started * 1e9)
    for stage, ms in timings_ms.items():
        if not ms or stage == "total":
            continue
        end = at + int(ms * 1e6)
        span = tracer.start_span(f"supportqa.{stage}", start_time=at)
        span.end(end_time=end)
        at = end
