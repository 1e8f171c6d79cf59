"""Text throughput: server QPS/latency with batching on vs off, against the encoder/search ceiling.

Every comparison is measured in this one run (the machines are noisy): quote ratios.
Usage: python benchmarks/bench_text.py [--duration 10] [--out docs/benchmarks/text.md]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BANKING = ROOT.parent / "shared" / "data" / "text" / "banking77" / "train.csv"
BIN = Path(sys.executable).parent


def banking_entries(kb: str):
    from supportqa.v1 import supportqa_pb2 as pb

    by_label: dict[str, list[str]] = defaultdict(list)
    with BANKING.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_label[row["category"]].append(row["text"])
    return [
        pb.Entry(knowledge_base=kb, id=label, title=label.replace("_", " "),
                 answer=f"Answer for {label}", questions=texts)
        for label, texts in sorted(by_label.items())
    ], [t for texts in by_label.values() for t in texts]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`supportqa-server serve` in a subprocess, so the load generator does not share its GIL;
    with ``source``, the server of an earlier tree (`git archive` of its server/ and
    clients/), run from this venv. Its log goes to data_dir/server.log."""

    def __init__(self, data_dir: Path, port: int, source: Path | None = None,
                 **env: str) -> None:
        self.port = port
        e = dict(os.environ, SUPPORTQA_SPEECH_MODEL="", SUPPORTQA_OCR="false",
                 SUPPORTQA_CLIP_MODEL="", SUPPORTQA_METRICS_PORT="0", HF_HUB_OFFLINE="1")
        e.update(env)
        args = ["--log-level", "WARNING", "serve", "--port", str(port), "--data-dir",
                str(data_dir)]
        if source is None:
            cmd = [str(BIN / "supportqa-server"), *args]
        else:  # the earlier tree first on the path: its server, its generated protos
            e["PYTHONPATH"] = f"{source / 'server'}{os.pathsep}{source / 'clients'}"
            cmd = [sys.executable, "-c", "import sys; from supportqa_server.cli import main; "
                   "sys.exit(main())", *args]
        self.proc = subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL,
                                     stderr=open(data_dir / "server.log", "w"))
        from supportqa.client import SupportClient

        t0 = time.perf_counter()
        with SupportClient(self.target) as c:
            c.wait_ready(600)
        self.start_s = time.perf_counter() - t0  # start-up to SERVING
        self.settle()

    def settle(self, timeout_s: float = 900.0) -> None:
        """Waits while the server trains entry heads (after start-up or writes): that CPU
        would land in the first load point, and its answers would rank without a head."""
        from supportqa.client import AsyncSupportClient
        from supportqa_tools.evaluation import wait_for_head

        async def wait() -> None:
            async with AsyncSupportClient(self.target) as c:
                for kb in (await c.stats()).knowledge_bases:
                    await wait_for_head(c, kb.name, timeout_s=timeout_s)

        asyncio.run(wait())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def ceiling(data_dir: Path, kb: str, queries: list[str]) -> dict:
    """Encoder alone (best batch) and Milvus search alone, in this process."""
    import torch
    from supportqa_server.knowledge.store import KnowledgeStore
    from supportqa_server.runtime.encoder import TextEncoder

    torch.set_num_threads(os.cpu_count() or 1)
    enc = TextEncoder()
    enc.encode(queries[:8])
    out: dict = {"encoder_sps": {}, "encoder_one_ms": encode_one_ms(enc, queries[:60])}
    for bs in (8, 16, 32, 64, 128):
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 4.0:
            batch = queries[n % 2000 : n % 2000 + bs]
            enc.encode(batch)
            n += len(batch)
        out["encoder_sps"][bs] = n / (time.perf_counter() - t)
    store = KnowledgeStore(str(data_dir / "milvus.db"), enc.dim)
    store.open()
    vecs = enc.encode(queries[:64])
    out["search_one_ms"] = search_one_ms(store, kb, vecs[:60], queries[:60])
    lat32 = []
    for _ in range(8):
        t = time.perf_counter()
        _search(store, kb, vecs[:32], queries[:32])
        lat32.append((time.perf_counter() - t) * 1000)
    out["search_32_ms"] = statistics.median(lat32)
    out["search_qps_batched"] = 32 / (out["search_32_ms"] / 1000)
    store.close()
    return out


def encode_one_ms(enc, queries: list[str]) -> float:
    """Median ms to embed one sentence, the sentences one by one."""
    one = []
    for q in queries:
        t = time.perf_counter()
        enc.encode([q])
        one.append((time.perf_counter() - t) * 1000)
    return statistics.median(one)


@functools.cache  # read once: the searches below are timed
def search_limits() -> tuple[int, int]:
    """Rows the server asks Milvus for a typed question, top_k=5, its entry head ready:
    (dense, BM25)."""
    from supportqa_server.answering.pipeline import (
        LEXICAL_ROWS,
        MIN_ROWS_HEAD,
        ROWS_PER_ANSWER_HEAD,
    )

    return max(MIN_ROWS_HEAD, 5 * ROWS_PER_ANSWER_HEAD), LEXICAL_ROWS


def _search(store, kb: str, vecs, qs: list[str]) -> None:
    dense, lexical = search_limits()
    store.search(kb, vecs, qs, limit=dense, lexical_limit=lexical)


def search_one_ms(store, kb: str, vecs, queries: list[str]) -> float:
    """Median ms of one question's store search, the questions one by one."""
    lat = []
    for i, q in enumerate(queries):
        t = time.perf_counter()
        _search(store, kb, vecs[i : i + 1], [q])
        lat.append((time.perf_counter() - t) * 1000)
    return statistics.median(lat)


def in_sequence_ms(enc, store, kb: str, queries: list[str]) -> float:
    """Median ms of one question encoded and then searched, as a script without a server
    would answer it. Each stage then starts cold (the other evicted its caches and its
    threads went to sleep): 5.9-6.1 against 5.1 ms to encode, back to back."""
    lat = []
    for q in queries:
        t = time.perf_counter()
        _search(store, kb, enc.encode([q]), [q])
        lat.append((time.perf_counter() - t) * 1000)
    return statistics.median(lat)


def lone_in_turns(target: str, floor_dir: Path, kb: str, queries: list[str], turns: int,
                  seconds: float) -> list[dict]:
    """A lone caller's p50 against the floor (one sentence's encode + its search, in this
    process on a copy of the knowledge base), measured in alternating turns: the machine's
    speed drifts 10-20% within minutes, and the c=1 point and the ceiling lie minutes apart."""
    from supportqa_server.knowledge.store import KnowledgeStore
    from supportqa_server.runtime.encoder import TextEncoder

    enc = TextEncoder()
    store = KnowledgeStore(str(floor_dir / "milvus.db"), enc.dim)
    store.open()
    out = []
    try:
        for turn in range(turns):
            qs = queries[turn * 40 : turn * 40 + 40]
            floor = encode_one_ms(enc, qs) + search_one_ms(store, kb, enc.encode(qs), qs)
            seq = in_sequence_ms(enc, store, kb, qs)
            p50 = asyncio.run(load(target, kb, queries, 1, seconds))["latency_ms"]["p50"]
            out.append({"floor_ms": floor, "seq_ms": seq, "p50_ms": p50,
                        "ratio": p50 / floor, "seq_ratio": p50 / seq})
            print("c=1 turn", out[-1], flush=True)
    finally:
        store.close()
    return out


async def load(target: str, kb: str, queries: list[str], concurrency: int, duration: float):
    from supportqa.bench import run_load
    from supportqa.client import question

    qs = [question(q, knowledge_base=kb, top_k=5) for q in queries]
    return await run_load(target, questions=qs, concurrency=concurrency, duration_s=duration,
                          warmup=min(4 * concurrency, 64), timeout=30.0)


def write_report(path: str | Path, lines: list[str]) -> int:
    """Writes a benchmark's Markdown report (docs/benchmarks/) and prints it; returns 0."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_text.md"))
    ap.add_argument("--port", type=int, default=50391)
    ap.add_argument("--turns", type=int, default=5, help="alternating c=1 / floor turns")
    args = ap.parse_args()
    kb = "banking"
    entries, texts = banking_entries(kb)
    rng = np.random.default_rng(7)
    queries = [texts[i] for i in rng.permutation(len(texts))]
    lines = [
        "# Text throughput benchmark",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; date {time.strftime('%Y-%m-%d %H:%M')}  ",
        f"Knowledge base: BANKING77 train, {len(entries)} entries, "
        f"{sum(len(e.questions) + 2 for e in entries)} texts (rows); load generator "
        f"`supportqa.bench.run_load` in a separate process from the server, {args.duration:g} s "
        "per point after warm-up.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        srv = Server(data, args.port)
        from supportqa.client import SupportClient

        t = time.perf_counter()
        with SupportClient(srv.target, timeout=600) as c:
            s = c.upsert(entries)
        ingest_s = time.perf_counter() - t
        srv.stop()
        floor_dir = Path(tmp) / "floor"  # the same knowledge base, for this process's searches
        shutil.copytree(data, floor_dir)
        lines += [f"Ingest: {s.rows} rows in {ingest_s:.1f} s ({s.rows / ingest_s:.0f} rows/s, "
                  "embedding included).", ""]
        print(lines[-2], flush=True)
        results: dict[tuple[str, int], dict] = {}
        rss = {}
        for label, env in (("on", {}), ("off", {"SUPPORTQA_MAX_BATCH": "1"})):
            srv = Server(data, args.port, **env)
            for c in args.concurrency:
                r = asyncio.run(load(srv.target, kb, queries, c, args.duration))
                results[(label, c)] = r
                print(label, c, r["rps"], r["latency_ms"], r["errors"], flush=True)
            if label == "on":
                lone = lone_in_turns(srv.target, floor_dir, kb, queries, args.turns, 3.0)
            rss[label] = rss_mb(srv.proc.pid)
            srv.stop()
        # Overload: far more callers than capacity, a small queue: only RESOURCE_EXHAUSTED,
        # bounded latency for accepted calls, flat memory.
        srv = Server(data, args.port, SUPPORTQA_MAX_QUEUE="64")
        asyncio.run(load(srv.target, kb, queries, 32, 3))
        rss_before = rss_mb(srv.proc.pid)
        over, rss_rounds = [], []
        for _ in range(3):
            over.append(asyncio.run(load(srv.target, kb, queries, 512, args.duration)))
            rss_rounds.append(rss_mb(srv.proc.pid))
        srv.stop()
        # Last: Milvus Lite lets one process own the data dir, and this one keeps it.
        ceil = ceiling(data, kb, queries)
        best_bs = max(ceil["encoder_sps"], key=ceil["encoder_sps"].get)
        best = ceil["encoder_sps"][best_bs]
        dense_rows, lexical_rows = search_limits()
        lines += [
            "## Ceiling (in-process, no gRPC)",
            "",
            "| what | figure |",
            "|---|---|",
            f"| encoder, one sentence, median | {ceil['encoder_one_ms']:.1f} ms |",
            *[f"| encoder, batch {bs} | {v:.0f} sentences/s |"
              for bs, v in ceil["encoder_sps"].items()],
            f"| Milvus search (dense {dense_rows} + BM25 {lexical_rows} rows), one query, "
            f"median | {ceil['search_one_ms']:.1f} ms |",
            f"| Milvus search, 32 queries in one call, median | {ceil['search_32_ms']:.1f} ms "
            f"({ceil['search_qps_batched']:.0f} queries/s) |",
            "",
        ]
        print("\n".join(lines[-10:]), flush=True)

    lines += [
        "## Server, batching on (max_batch 64) vs off (max_batch 1)",
        "",
        "| concurrency | QPS on | QPS off | on/off | p50 on (ms) | p99 on (ms) | p99/p50 on | "
        "p50 off (ms) | p99 off (ms) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in args.concurrency:
        on, off = results[("on", c)], results[("off", c)]
        errs = {**on["errors"], **{f"off:{k}": v for k, v in off["errors"].items()}}
        lines.append(
            f"| {c} | {on['rps']:.1f} | {off['rps']:.1f} | {on['rps'] / off['rps']:.2f}x | "
            f"{on['latency_ms']['p50']:.1f} | {on['latency_ms']['p99']:.1f} | "
            f"{on['latency_ms']['p99'] / on['latency_ms']['p50']:.2f} | "
            f"{off['latency_ms']['p50']:.1f} | {off['latency_ms']['p99']:.1f} | {errs or '-'} |"
        )
    c1 = results[("on", 1)]["latency_ms"]["p50"]
    floor = ceil["encoder_one_ms"] + ceil["search_one_ms"]
    lines += [
        "",
        "## Against the targets",
        "",
        "| target | measured |",
        "|---|---|",
    ]
    if 32 in args.concurrency:
        on32, off32 = results[("on", 32)], results[("off", 32)]
        lines += [
            f"| c=32 QPS >= 3x batching off | {on32['rps'] / off32['rps']:.2f}x |",
            f"| c=32 QPS >= 0.7x encoder ceiling ({best:.0f}/s at batch {best_bs}) | "
            f"{on32['rps'] / best:.2f}x |",
            f"| c=32 p99 <= 3x p50 | "
            f"{on32['latency_ms']['p99'] / on32['latency_ms']['p50']:.2f}x |",
        ]
    def turns(key: str, floor_key: str) -> str:
        r = [t[key] for t in lone]
        return (f"median **{statistics.median(r):.2f}x** (range {min(r):.2f}-{max(r):.2f}; "
                f"floor {statistics.median(t[floor_key] for t in lone):.1f} ms, p50 "
                f"{statistics.median(t['p50_ms'] for t in lone):.1f} ms)")

    lines += [
        f"| c=1 p50 <= 1.3x (encoder one sentence + search) = {floor:.1f} ms | {c1:.1f} ms = "
        f"{c1 / floor:.2f}x (the c=1 point above against the ceiling run, minutes apart) |",
        f"| the same, in {len(lone)} alternating turns of the floor and 3 s at c=1; floor: "
        f"each stage timed in its own loop (encode, encode, ...; search, search, ...) | "
        f"{turns('ratio', 'floor_ms')} |",
        f"| the same turns; floor: each question encoded then searched, as a script without "
        f"a server does | {turns('seq_ratio', 'seq_ms')} |",
        "",
        f"## Overload (512 callers, queue bound 64, {len(over)} rounds)",
        "",
        "| round | requests | QPS | p50 (ms) | p99 (ms) | max (ms) | errors | RSS after (MB) |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {i + 1} | {o['requests']} | {o['rps']:.1f} | {o['latency_ms']['p50']:.1f} | "
          f"{o['latency_ms']['p99']:.1f} | {o['latency_ms']['max']:.1f} | {o['errors']} | "
          f"{m:.0f} |" for i, (o, m) in enumerate(zip(over, rss_rounds, strict=True))],
        "",
        f"Server RSS: {rss_before:.0f} MB before overload (after a warm-up at concurrency 32); "
        f"batching on: {rss['on']:.0f} MB, off: {rss['off']:.0f} MB after their runs.",
        "",
    ]
    return write_report(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
