"""Overload: 512 callers against one server, with time-based shedding (the default) and with
only the count bound (SUPPORTQA_MAX_QUEUE_MS=0), measured in turn in one run; and Asks beside a
bulk ingest.

Usage: python benchmarks/bench_overload.py [--duration 20] [--out docs/benchmarks/overload.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_text import Server, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_KB = ROOT / "knowledge" / "sample.jsonl"
BACKOFF_S = 0.1  # a refused caller waits 0.05-0.1 s, doubling per refusal in a row, to 3.2 s


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def questions() -> list[str]:
    from supportqa.knowledge_file import read_entries

    return [q for e in read_entries(SAMPLE_KB) for q in e.questions]


async def load(target: str, qs: list[str], concurrency: int, duration: float) -> dict:
    from supportqa.bench import run_load
    from supportqa.client import question

    return await run_load(target, questions=[question(q, top_k=3) for q in qs],
                          concurrency=concurrency, duration_s=duration, timeout=30.0,
                          warmup=64, channels=8, backoff_s=BACKOFF_S)


HEADER = ("| {} | calls | answered | answered/s | refused | refusal p50 / p99 ms | other errors "
          "| p50 ms | p99 ms | p99/p50 |")
RULE = "|---|---|---|---|---|---|---|---|---|---|"


def row(name: str, r: dict) -> str:
    lat = r["latency_ms"]
    refused = r["errors"].get("RESOURCE_EXHAUSTED", 0)
    other = {k: v for k, v in r["errors"].items() if k != "RESOURCE_EXHAUSTED"}
    ratio = lat["p99"] / lat["p50"] if lat["p50"] else float("nan")
    rms = r["refused_ms"]
    took = f"{rms['p50']:.0f} / {rms['p99']:.0f}" if refused else "-"
    return (f"| {name} | {r['requests']} | {r['ok']} | {r['ok'] / r['duration_s']:.1f} | "
            f"{refused} | {took} | {other or '-'} | {lat['p50']:.0f} | {lat['p99']:.0f} | "
            f"{ratio:.2f} |")


def with_writer(target: str, stop: threading.Event) -> None:
    """Re-upserts the sample knowledge base under another name until stopped."""
    from supportqa.client import SupportClient
    from supportqa.knowledge_file import read_entries

    entries = list(read_entries(SAMPLE_KB))
    for e in entries:
        e.knowledge_base = "bulk"
    with SupportClient(target, timeout=300) as c:
        while not stop.is_set():
            c.upsert(entries)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per load point")
    ap.add_argument("--concurrency", type=int, default=512)
    ap.add_argument("--port", type=int, default=50393)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "overload.md"))
    args = ap.parse_args()
    qs = questions()
    lines = [
        "# Overload and fairness",
        "",
        f"Command: `python benchmarks/bench_overload.py --duration {args.duration:g} "
        f"--concurrency {args.concurrency}`  ",
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}  ",
        f"Server: text only, the sample knowledge base ({SAMPLE_KB.name}); load generator "
        f"`supportqa.bench.run_load` in another process, 8 channels, 30 s deadlines, "
        f"{args.duration:g} s per point after 64 warm-up calls. Latency percentiles are of "
        "the calls answered (OK); refused calls are RESOURCE_EXHAUSTED, after which a caller backs "
        f"off exponentially from {BACKOFF_S * 1000:.0f} ms with jitter, as a client told to "
        "retry with backoff does.",
        "",
        f"## {args.concurrency} callers",
        "",
        HEADER.format("server"),
        RULE,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in (("count bound only (SUPPORTQA_MAX_QUEUE_MS=0)",
                           {"SUPPORTQA_MAX_QUEUE_MS": "0"}),
                          ("default (max_queue_ms 1000)", {})):
            data = Path(tmp) / name.split()[0]
            srv = Server(data, args.port, **env)
            try:
                from supportqa.client import SupportClient
                from supportqa.knowledge_file import read_entries

                with SupportClient(srv.target, timeout=300) as c:
                    c.upsert(read_entries(SAMPLE_KB))
                srv.settle()
                r = asyncio.run(load(srv.target, qs, args.concurrency, args.duration))
                lines.append(row(name, r))
                print(lines[-1], flush=True)
                if not env:
                    alone = asyncio.run(load(srv.target, qs, 8, args.duration))
                    stop = threading.Event()
                    writer = threading.Thread(target=with_writer, args=(srv.target, stop))
                    writer.start()
                    time.sleep(2)
                    beside = asyncio.run(load(srv.target, qs, 8, args.duration))
                    stop.set()
                    writer.join()
            finally:
                srv.stop()
    lines += [
        "",
        "## 8 callers asking, alone and beside a writer re-upserting the sample knowledge base",
        "",
        HEADER.format("load"),
        RULE,
        row("Asks alone", alone),
        row("Asks beside the writer", beside),
        "",
    ]
    return write_report(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
