"""The gRPC application: server construction, health, reflection, start-up ingest, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from supportqa.v1 import supportqa_pb2 as pb
from supportqa.v1 import supportqa_pb2_grpc as pb_grpc

from supportqa_server.answering.pipeline import Pipeline
from supportqa_server.api import converters as conv
from supportqa_server.api.auth import KeyRing
from supportqa_server.api.metrics import Metrics
from supportqa_server.api.observe import ObservingInterceptor
from supportqa_server.api.servicers import AnsweringServicer, KnowledgeServicer
from supportqa_server.errors import InvalidInput, SupportQAError
from supportqa_server.knowledge.writer import FileEntry, WriteReport, write_file
from supportqa_server.runtime.settings import Settings

log = logging.getLogger(__name__)

SERVICES = (
    pb.DESCRIPTOR.services_by_name["Answering"].full_name,
    pb.DESCRIPTOR.services_by_name["Knowledge"].full_name,
)


class _Health(health.aio.HealthServicer):
    """grpc.health.v1 that starts NOT_SERVING (the stock servicer starts SERVING)."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("", *SERVICES):
            self._server_status[name] = health_pb2.HealthCheckResponse.NOT_SERVING


class App:
    """A server, its pipeline, health servicer, metrics and keys."""

    def __init__(self, server: grpc.aio.Server, port: int, pipeline: Pipeline,
                 health_servicer: health.aio.HealthServicer, *, settings: Settings,
                 metrics: Metrics, keys: KeyRing) -> None:
        self.server, self.port, self.pipeline, self.health = server, port, pipeline, health_servicer
        self.settings, self.metrics, self.keys = settings, metrics, keys
        self.metrics_port = 0  # bound by start()
        if hasattr(pipeline, "on_store_health"):  # health follows Milvus's outages
            pipeline.on_store_health = self.set_serving

    async def start(self) -> None:
        """Starts the metrics endpoint and serving gRPC (NOT_SERVING until `load`).

        Raises:
            InvalidInput: the metrics port cannot be bound.
        """
        s = self.settings
        if s.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
            except OSError as e:
                raise InvalidInput(
                    f"cannot serve metrics on {s.host}:{s.metrics_port} ({e.strerror}): set "
                    "SUPPORTQA_METRICS_PORT to a free port, or 0 to turn metrics off") from e
            log.info("metrics on http://%s:%d/metrics", s.host, self.metrics_port)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def load(self) -> None:
        """Loads models and store, then reports SERVING."""
        await self.pipeline.start()
        await self.set_serving(True)

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.pipeline.close()
        self.metrics.close()


def _credentials(s: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files; None for plaintext."""
    if s.tls_cert is None or s.tls_key is None:
        return None
    try:
        chain, key = s.tls_cert.read_bytes(), s.tls_key.read_bytes()
        ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
    except OSError as e:
        raise InvalidInput(f"cannot read a TLS file: {e}") from e
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def create_server(settings: Settings, pipeline: Pipeline | None = None) -> tuple[App, int]:
    """Builds a grpc.aio server bound to settings.host:settings.port (0 = free port).

    The server is not started and the pipeline not loaded: `await app.start()`, then
    `await app.load()`. Health reports NOT_SERVING until `load` finishes.

    Raises:
        InvalidInput: a keys file or TLS file that cannot be read.
    """
    pipeline = pipeline or Pipeline(settings)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    try:
        keys = KeyRing(settings.api_keys, settings.api_keys_file)
    except ValueError as e:
        raise InvalidInput(f"SUPPORTQA_API_KEYS_FILE: {e}") from e
    metrics = Metrics()
    if hasattr(pipeline, "models"):  # a real pipeline (tests may pass a fake one)
        metrics.watch(pipeline)

    def known_kb(kb: str) -> bool:
        store = getattr(pipeline, "store", None)
        return store is not None and store.has(kb)

    if settings.tracing:
        from supportqa_server.api.tracing import instrument

        try:
            instrument()
        except ImportError as e:
            raise InvalidInput(f"SUPPORTQA_TRACING needs the tracing extra ({e}): pip install "
                               "'supportqa[tracing]'") from e
    interceptor = ObservingInterceptor(metrics, keys, known_kb, settings.log_questions,
                                       settings.tracing)
    server = grpc.aio.server(options=options, interceptors=[interceptor])
    pb_grpc.add_AnsweringServicer_to_server(AnsweringServicer(pipeline), server)
    pb_grpc.add_KnowledgeServicer_to_server(KnowledgeServicer(pipeline), server)
    health_servicer = _Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    credentials = _credentials(settings)
    port = (server.add_secure_port(address, credentials) if credentials
            else server.add_insecure_port(address))
    if port == 0:
        raise RuntimeError(f"cannot bind {address}: is it in use?")
    app = App(server, port, pipeline, health_servicer, settings=settings, metrics=metrics,
              keys=keys)
    return app, port


async def ingest_file(pipeline: Pipeline, path: Path) -> WriteReport:
    """Loads a JSONL knowledge base into the pipeline (`serve --ingest`): every line is checked
    before the first write, and a file with any invalid line writes nothing.

    Raises:
        InvalidInput: naming each bad line as FILE:LINE.
    """
    from supportqa.knowledge_file import KnowledgeFileError, read_numbered

    try:
        entries = [FileEntry(n, *conv.entry_data(msg), tuple(conv.entry_images(msg)))
                   for n, msg in read_numbered(path)]
    except (KnowledgeFileError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{e}; nothing written") from e
    return await write_file(pipeline, path, entries)


@contextlib.asynccontextmanager
async def running_server(
    settings: Settings, pipeline: Pipeline | None = None
) -> AsyncIterator[str]:
    """Starts a server with loaded models for the block; yields its "host:port"."""
    app, port = create_server(settings, pipeline)
    await app.start()
    try:
        await app.load()
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        yield f"{host}:{port}"
    finally:
        await app.stop(0)


async def serve(settings: Settings, ingest: Iterable[Path] = ()) -> None:
    """Runs the server until SIGINT/SIGTERM, then drains in-flight calls for grace_seconds.

    A signal during start-up (models loading, the store opening, --ingest) stops the process
    at once: that work runs on threads that cannot be interrupted, and nothing it does is
    acknowledged to anyone yet (a write is only acknowledged once committed).
    """
    try:
        app, port = create_server(settings)
        await app.start()
    except SupportQAError as e:
        log.error("cannot start: %s", e)
        raise SystemExit(2) from None
    log.info("listening on %s:%d%s (NOT_SERVING until models are loaded)", settings.host, port,
             " with TLS" if settings.tls_cert else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app.keys.reload)
    starting = asyncio.create_task(_start(app, ingest))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.warning("stopped during start-up")
        os._exit(128 + signal.SIGTERM)
    stopping.cancel()
    try:
        starting.result()
    except SupportQAError as e:
        log.error("cannot start: %s", e)
        await app.stop(0)
        raise SystemExit(2) from None
    log.info("SERVING on %s:%d", settings.host, port)
    await stop.wait()
    log.info("shutting down: draining for %.1f s", settings.grace_seconds)
    await app.stop(settings.grace_seconds)


async def _start(app: App, ingest: Iterable[Path]) -> None:
    """Loads models and store, ingests the start-up files, then reports SERVING."""
    await app.pipeline.start()
    for path in ingest:
        report = await ingest_file(app.pipeline, path)
        log.info("ingested %s: %d entries (%d replaced), %d rows", path, report.written,
                 report.replaced, report.rows)
    await app.set_serving(True)
