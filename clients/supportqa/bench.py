"""Load generator for the Answering service (``supportqa-bench``): concurrent callers, latencies."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import grpc

from supportqa.cli import add_tls_options, tls_of
from supportqa.client import AUDIO_FORMATS, TLS, audio_format_of
from supportqa.v1 import supportqa_pb2, supportqa_pb2_grpc

Question = supportqa_pb2.Question

MODES = ("unary", "stream")
RETRY_LATER = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")  # a caller with backoff waits after these

# The API key travels as "authorization: Bearer <key>", as supportqa.client sends it.
API_KEY_METADATA = "authorization"

IMAGE_MIME_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}

_CHANNEL_OPTIONS = [
    # Answers are small, but a server echoing long image text must not trip the 4 MiB default.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Without a local pool, channels with equal arguments share one TCP connection, and
    # --channels would not spread load over connections.
    ("grpc.use_local_subchannel_pool", 1),
]


class Sample(NamedTuple):
    """Outcome of one call; times in seconds from the start of the call."""

    code: str  # grpc.StatusCode name, "OK" on success, or an exception class name
    latency_s: float  # until the reply (unary) or the end of the stream
    ttfe_s: float | None  # until the first stream event; None for unary calls or none received
    ttfa_s: float | None  # until the first Answer or NoAnswer event; None as above


def percentile(values: Sequence[float], q: float) -> float:
    """Returns the q-th percentile of values by the nearest-rank method.

    The result is always one of the values: the one at 1-based rank ceil(q / 100 * n) of the
    sorted values (rank 1 for q = 0).

    Args:
        values: The observations, in any order.
        q: The percentile, in [0, 100].

    Returns:
        The nearest-rank percentile.

    Raises:
        ValueError: values is empty or q is outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of an empty sequence is undefined; pass at least one value")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms_percentiles(seconds: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    return {f"p{q}": round(percentile(seconds, q) * 1000, 3) if seconds else None for q in qs}


def summarize(
    samples: Sequence[Sample],
    elapsed_s: float,
    *,
    mode: str,
    concurrency: int,
    channels: int = 1,
    target: str = "",
    warmup: int = 0,
) -> dict:
    """Turns the samples of a measured run into the report that ``run_load`` returns.

    Latency percentiles cover successful calls only, so fast failures do not flatter them;
    ``requests`` and ``rps`` count every completed call.

    Args:
        samples: One per completed call of the measured phase.
        elapsed_s: Wall time of the measured phase in seconds.
        mode: "unary" or "stream".
        concurrency: Number of concurrent callers.
        channels: Number of gRPC channels the callers shared.
        target: The server address, for the record.
        warmup: Calls made before measuring, for the record.

    Returns:
        The report: ``requests``, ``ok``, ``rps``, ``latency_ms`` {p50, p90, p99, max},
        ``errors`` {status name: count}, ``duration_s``, ``mode``, ``concurrency``,
        ``channels``, ``target``, ``warmup``, ``refused_ms`` {p50, p99} (how long a
        RESOURCE_EXHAUSTED took to arrive), and for streams ``ttfe_ms`` and ``ttfa_ms``
        {p50, p99} (time to the first event, and to the first Answer or NoAnswer).
        Percentiles are None when no call succeeded.
    """
    ok = [s for s in samples if s.code == "OK"]
    latencies = [s.latency_s for s in ok]
    latency_ms = _ms_percentiles(latencies, (50, 90, 99))
    latency_ms["max"] = round(max(latencies) * 1000, 3) if latencies else None
    refused = [s.latency_s for s in samples if s.code == "RESOURCE_EXHAUSTED"]
    report = {
        "target": target,
        "mode": mode,
        "concurrency": concurrency,
        "channels": channels,
        "warmup": warmup,
        "requests": len(samples),
        "ok": len(ok),
        "duration_s": round(elapsed_s, 3),
        "rps": round(len(samples) / elapsed_s, 3) if elapsed_s > 0 else 0.0,
        "latency_ms": latency_ms,
        "errors": dict(sorted(Counter(s.code for s in samples if s.code != "OK").items())),
        "refused_ms": _ms_percentiles(refused, (50, 99)),
    }
    if mode == "stream":
        report["ttfe_ms"] = _ms_percentiles(
            [s.ttfe_s for s in ok if s.ttfe_s is not None], (50, 99)
        )
        report["ttfa_ms"] = _ms_percentiles(
            [s.ttfa_s for s in ok if s.ttfa_s is not None], (50, 99)
        )
    return report


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_report(report: dict) -> str:
    """Renders a ``run_load`` report as a plain-text table.

    Args:
        report: As returned by ``run_load`` or ``summarize``.

    Returns:
        The table, lines joined by newlines, no trailing newline.
    """
    channels = report.get("channels", 1)
    n_errors = sum(report["errors"].values())
    lines = [
        f"target       {report.get('target') or '-'}",
        f"mode         {report['mode']}",
        f"concurrency  {report['concurrency']} ({channels} channel{'' if channels == 1 else 's'})",
        (
            f"requests     {report['requests']} ({report.get('ok', 0)} ok, "
            f"{n_errors} errors; warmup {report.get('warmup', 0)} not counted)"
        ),
        f"duration     {report['duration_s']:.2f} s",
        f"rps          {report['rps']:.1f}",
        "",
        f"{'ms':<14}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}",
    ]
    lat = report["latency_ms"]
    lines.append(
        f"{'latency':<14}{_cell(lat['p50']):>9}{_cell(lat['p90']):>9}"
        f"{_cell(lat['p99']):>9}{_cell(lat['max']):>9}"
    )
    for key, name in (("ttfe_ms", "first event"), ("ttfa_ms", "first answer")):
        if key in report:
            row = report[key]
            lines.append(f"{name:<14}{_cell(row['p50']):>9}{'':>9}{_cell(row['p99']):>9}{'':>9}")
    if report["errors"]:
        lines += ["", "errors"]
        lines += [f"  {code:<24}{count:>8}" for code, count in report["errors"].items()]
    return "\n".join(lines)


Call = Callable[
    [supportqa_pb2_grpc.AnsweringStub, Question, float, Sequence[tuple[str, str]] | None],
    Awaitable[Sample],
]


async def _ask_unary(stub, question, timeout, metadata) -> Sample:
    start = time.perf_counter()
    try:
        await stub.Ask(question, timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as e:
        return Sample(e.code().name, time.perf_counter() - start, None, None)
    except Exception as e:  # noqa: BLE001 - a load generator records failures, it does not stop
        return Sample(type(e).__name__, time.perf_counter() - start, None, None)
    return Sample("OK", time.perf_counter() - start, None, None)


async def _ask_stream(stub, question, timeout, metadata) -> Sample:
    start = time.perf_counter()
    ttfe = ttfa = None
    try:
        async for event in stub.AskStream(question, timeout=timeout, metadata=metadata):
            now = time.perf_counter() - start
            if ttfe is None:
                ttfe = now
            if ttfa is None and event.WhichOneof("event") in ("answer", "no_answer"):
                ttfa = now
    except grpc.aio.AioRpcError as e:
        return Sample(e.code().name, time.perf_counter() - start, ttfe, ttfa)
    except Exception as e:  # noqa: BLE001 - as in _ask_unary
        return Sample(type(e).__name__, time.perf_counter() - start, ttfe, ttfa)
    return Sample("OK", time.perf_counter() - start, ttfe, ttfa)


async def _phase(
    stubs: Sequence[supportqa_pb2_grpc.AnsweringStub],
    questions: Sequence[Question],
    call: Call,
    *,
    concurrency: int,
    requests: int | None,
    duration_s: float | None,
    timeout: float,
    metadata: Sequence[tuple[str, str]] | None,
    backoff_s: float = 0.0,
) -> tuple[list[Sample], float]:
    loop = asyncio.get_running_loop()
    end = loop.time() + duration_s if duration_s is not None else math.inf
    tickets = itertools.count()
    samples: list[Sample] = []

    async def caller(index: int) -> None:
        stub = stubs[index % len(stubs)]
        refusals = 0  # in a row
        jitter = random.Random(index)
        while loop.time() < end:
            i = next(tickets)
            if requests is not None and i >= requests:
                return
            sample = await call(stub, questions[i % len(questions)], timeout, metadata)
            samples.append(sample)
            refusals = refusals + 1 if sample.code in RETRY_LATER else 0
            if refusals and backoff_s > 0:
                # Exponential with jitter, as gRPC's retry policy: base x 2^n, at most 32x.
                wait = backoff_s * 2 ** min(refusals - 1, 5) * jitter.uniform(0.5, 1.0)
                await asyncio.sleep(min(wait, max(0.0, end - loop.time())))

    start = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return samples, time.perf_counter() - start


async def run_load(
    target: str,
    *,
    questions: list[Question],
    concurrency: int,
    duration_s: float | None = None,
    requests: int | None = None,
    mode: str = "unary",
    timeout: float = 30.0,
    warmup: int = 0,
    metadata: Sequence[tuple[str, str]] | None = None,
    tls: TLS | None = None,
    channels: int = 1,
    backoff_s: float = 0.0,
) -> dict:
    """Runs concurrent callers against an Answering server and reports throughput and latency.

    Callers take questions round-robin from ``questions``. The run stops after ``requests``
    calls or ``duration_s`` seconds, whichever comes first; calls in flight at the end finish
    (each bounded by ``timeout``). The ``warmup`` calls run first, with the same concurrency,
    and are not counted.

    Args:
        target: Server address, "host:port".
        questions: The questions to ask, with knowledge_base and top_k already set.
        concurrency: Number of concurrent callers.
        duration_s: Length of the measured phase in seconds.
        requests: Number of calls in the measured phase.
        mode: "unary" for Ask, "stream" for AskStream.
        timeout: Deadline of each call in seconds.
        warmup: Calls made before measuring.
        metadata: gRPC metadata sent with every call, e.g. the API key.
        tls: Connect with TLS (supportqa.client.TLS); None: plaintext.
        channels: Number of gRPC channels (TCP connections); caller i uses channel i mod K.
        backoff_s: After RESOURCE_EXHAUSTED or UNAVAILABLE a caller waits this long, doubled
            for each refusal in a row (at most 32x), with jitter; 0: it calls again at once.

    Returns:
        The report described in ``summarize``.

    Raises:
        ValueError: An argument is out of range, or neither duration_s nor requests is given.
        ConnectionError: The server was not reachable within ``timeout`` seconds.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if duration_s is None and requests is None:
        raise ValueError("give duration_s or requests (or both) so the run stops by itself")
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    if requests is not None and requests < 1:
        raise ValueError(f"requests must be at least 1, got {requests}")
    if not questions:
        raise ValueError("questions is empty; give at least one question")
    if concurrency < 1 or channels < 1 or warmup < 0 or timeout <= 0:
        raise ValueError(
            "concurrency and channels must be at least 1, warmup at least 0 and timeout positive"
        )
    call = _ask_unary if mode == "unary" else _ask_stream
    pool = [
        grpc.aio.secure_channel(target, tls.credentials(), options=_CHANNEL_OPTIONS + tls.options())
        if tls else grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        for _ in range(channels)
    ]
    try:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(channel.channel_ready() for channel in pool)), timeout
            )
        except TimeoutError as e:
            raise ConnectionError(
                f"could not connect to {target} within {timeout:g} s; is the server running?"
            ) from e
        stubs = [supportqa_pb2_grpc.AnsweringStub(channel) for channel in pool]
        common = {"concurrency": concurrency, "timeout": timeout, "metadata": metadata,
                  "backoff_s": backoff_s}
        if warmup:
            await _phase(stubs, questions, call, requests=warmup, duration_s=None, **common)
        samples, elapsed = await _phase(
            stubs, questions, call, requests=requests, duration_s=duration_s, **common
        )
    finally:
        await asyncio.gather(*(channel.close() for channel in pool))
    return summarize(
        samples,
        elapsed,
        mode=mode,
        concurrency=concurrency,
        channels=channels,
        target=target,
        warmup=warmup,
    )


def load_questions(
    *,
    text_file: str | Path | None = None,
    audio_files: Sequence[str | Path] = (),
    image_files: Sequence[str | Path] = (),
    knowledge_base: str = "default",
    top_k: int = 5,
    pcm_sample_rate_hz: int = 16000,
) -> list[Question]:
    """Reads questions from files and interleaves the modalities round-robin.

    Args:
        text_file: UTF-8 text, one question per line; blank lines are skipped.
        audio_files: Audio files; the format comes from the extension (.wav, .flac, .ogg,
            .opus, .mp3; .pcm and .raw are mono 16-bit PCM at ``pcm_sample_rate_hz``), any
            other extension lets the server detect it.
        image_files: Image files; the media type comes from the extension, empty if unknown.
        knowledge_base: Knowledge base every question asks.
        top_k: Answers asked for per question.
        pcm_sample_rate_hz: Sample rate of .pcm and .raw files.

    Returns:
        Questions alternating text, audio, image (for the modalities given), cycling through
        each modality's items until the longest is used up.

    Raises:
        ValueError: No questions were given, or the text file holds none.
        OSError: A file cannot be read.
    """
    pools: list[list[Question]] = []
    if text_file is not None:
        lines = Path(text_file).read_text(encoding="utf-8").splitlines()
        texts = [line.strip() for line in lines if line.strip()]
        if not texts:
            raise ValueError(f"{text_file} holds no questions; write one question per line")
        pools.append([Question(text=t) for t in texts])
    if audio_files:
        pool = []
        for path in map(Path, audio_files):
            fmt = AUDIO_FORMATS[audio_format_of(path)]
            audio = supportqa_pb2.Audio(data=path.read_bytes(), format=fmt)
            if fmt == supportqa_pb2.AUDIO_FORMAT_PCM16:
                audio.sample_rate_hz = pcm_sample_rate_hz
                audio.channels = 1
            pool.append(Question(audio=audio))
        pools.append(pool)
    if image_files:
        pools.append(
            [
                Question(
                    image=supportqa_pb2.Image(
                        data=path.read_bytes(),
                        mime_type=IMAGE_MIME_TYPES.get(path.suffix.lower(), ""),
                    )
                )
                for path in map(Path, image_files)
            ]
        )
    if not pools:
        raise ValueError("no questions: give --text, --audio or --image")
    mixed = [
        pools[i % len(pools)][(i // len(pools)) % len(pools[i % len(pools)])]
        for i in range(len(pools) * max(map(len, pools)))
    ]
    for question in mixed:
        question.knowledge_base = knowledge_base
        question.top_k = top_k
    return mixed


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of ``supportqa-bench``."""
    parser = argparse.ArgumentParser(
        prog="supportqa-bench",
        description="Load-test a supportqa server: concurrent Ask or AskStream calls, "
        "latency percentiles and errors by status code.",
    )
    parser.add_argument("--target", default="localhost:50051", help="server HOST:PORT")
    parser.add_argument("--concurrency", "-c", type=int, default=8, help="concurrent callers")
    parser.add_argument(
        "--channels", type=int, default=1, help="gRPC channels (TCP connections) to spread over"
    )
    stop = parser.add_argument_group(
        "stopping", "the run stops at whichever comes first; 200 requests if neither is given"
    )
    stop.add_argument("--duration", "-z", type=float, help="seconds of measured load")
    stop.add_argument("--requests", "-n", type=int, help="calls in the measured phase")
    parser.add_argument("--warmup", type=int, default=0, help="calls made first, not counted")
    parser.add_argument("--mode", choices=MODES, default="unary", help="Ask or AskStream")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    inputs = parser.add_argument_group("questions", "several modalities are mixed round-robin")
    inputs.add_argument("--text", metavar="FILE", help="text file, one question per line")
    inputs.add_argument(
        "--audio", metavar="FILE", nargs="+", default=[], help="audio files; format by extension"
    )
    inputs.add_argument(
        "--image", metavar="FILE", nargs="+", default=[], help="image files; type by extension"
    )
    inputs.add_argument(
        "--pcm-rate", type=int, default=16000, help="sample rate of .pcm/.raw audio in Hz"
    )
    parser.add_argument("--knowledge-base", default="default", help="knowledge base to ask")
    parser.add_argument("--top-k", type=int, default=5, help="answers per question")
    parser.add_argument("--api-key", help="sent as metadata 'authorization: Bearer KEY'")
    add_tls_options(parser)
    parser.add_argument("--json-out", metavar="FILE", help="also write the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``supportqa-bench``.

    Returns:
        0 when the run completed with at least one successful call, 1 when every call failed,
        2 on bad arguments or an unreachable server.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    requests = args.requests
    if requests is None and args.duration is None:
        requests = 200
    try:
        questions = load_questions(
            text_file=args.text,
            audio_files=args.audio,
            image_files=args.image,
            knowledge_base=args.knowledge_base,
            top_k=args.top_k,
            pcm_sample_rate_hz=args.pcm_rate,
        )
    except (OSError, ValueError) as e:
        print(f"supportqa-bench: error: {e}", file=sys.stderr)
        return 2
    metadata = [(API_KEY_METADATA, f"Bearer {args.api_key}")] if args.api_key else None
    try:
        report = asyncio.run(
            run_load(
                args.target,
                questions=questions,
                concurrency=args.concurrency,
                duration_s=args.duration,
                requests=requests,
                mode=args.mode,
                timeout=args.timeout,
                warmup=args.warmup,
                metadata=metadata,
                channels=args.channels,
                tls=tls_of(args),
            )
        )
    except (ConnectionError, ValueError, OSError) as e:
        print(f"supportqa-bench: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if report["ok"] == 0:
        print("supportqa-bench: every call failed; see errors above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
