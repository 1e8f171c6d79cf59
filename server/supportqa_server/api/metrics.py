"""Prometheus metrics: the standard gRPC server families, questions by outcome, stage latency,
answer confidence, model queues and batches, and the knowledge bases' state at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds: from a lone cached question (~5 ms) to a long voice question under load (~30 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # confidences lie in [0, 1]
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UNKNOWN_KB = "_unknown"  # label of a question naming no existing knowledge base


class Metrics:
    """One server's metrics, in a registry of their own (tests run several servers)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        grpc_labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.",
                               grpc_labels, registry=r)
        self.handled = Counter("grpc_server_handled_total",
                               "RPCs completed on the server, regardless of success or failure.",
                               [*grpc_labels, "grpc_code"], registry=r)
        self.handling = Histogram("grpc_server_handling_seconds",
                                  "Time from an RPC's start to its status, in seconds.",
                                  grpc_labels, buckets=LATENCY_BUCKETS, registry=r)
        self.questions = Counter("supportqa_questions_total", "Questions by their outcome.",
                                 ["knowledge_base", "modality", "outcome"], registry=r)
        self.stage = Histogram("supportqa_stage_seconds",
                               "Time a question spent in each stage, in seconds.",
                               ["stage", "modality"], buckets=LATENCY_BUCKETS, registry=r)
        self.confidence = Histogram("supportqa_answer_confidence",
                                    "Score of a question's best match (answered or not).",
                                    ["modality"], buckets=SCORE_BUCKETS, registry=r)
        self.batch_size = Histogram("supportqa_batch_size", "Items per model batch.",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self._http = None

    def watch(self, pipeline) -> None:
        """Reports the pipeline's queues, knowledge bases and entry heads at each scrape, and
        observes every model batch."""
        self.registry.register(_PipelineCollector(pipeline))
        pipeline.models.on_batch = lambda model, n: self.batch_size.labels(model).observe(n)

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP on host:port (0: any free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _PipelineCollector:
    """Gauges read from the pipeline when Prometheus scrapes, so they are never stale."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def describe(self):
        return []  # collected lazily: the registry must not call collect() at registration

    def collect(self):
        queued = GaugeMetricFamily("supportqa_queue_depth", "Items waiting for a model.",
                                   labels=["model"])
        for name, b in self.pipeline.models.batchers.items():
            queued.add_metric([name], len(b))
        yield queued
        if not self.pipeline.ready:
            return
        entries = GaugeMetricFamily("supportqa_entries", "Entries per knowledge base.",
                                    labels=["knowledge_base"])
        rows = GaugeMetricFamily("supportqa_rows", "Searchable texts per knowledge base.",
                                 labels=["knowledge_base"])
        head = GaugeMetricFamily(
            "supportqa_entry_head", "1 for the entry head's state (ready, training, off).",
            labels=["knowledge_base", "state"])
        for name, n_entries, n_rows, _, _, state, *_ in self.pipeline.stats():
            entries.add_metric([name], n_entries)
            rows.add_metric([name], n_rows)
            for s in ("ready", "training", "off"):
                head.add_metric([name, s], 1.0 if s == state else 0.0)
        yield from (entries, rows, head)
        traffic = getattr(self.pipeline, "traffic", None)
        if traffic is not None:
            logged = CounterMetricFamily(
                "supportqa_question_log_rows",
                "Questions for the question log: written, failed (a write that failed; the row "
                "is tried again) or dropped (lost: queue full, or failed 3 times).",
                labels=["result"])
            q = traffic.log
            for result, n in (("written", q.written), ("failed", q.failed),
                              ("dropped", q.dropped + traffic.failed)):
                logged.add_metric([result], n)
            yield logged
