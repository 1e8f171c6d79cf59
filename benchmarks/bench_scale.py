"""Cost as the knowledge base grows: the default server on Milvus Lite and on a Milvus server,
one knowledge base grown through the API to each size in turn.

At each size: ingest rows/s of the step (embedding included), the seconds until the entry
head and the threshold's calibration settle after it, Ask p50/p99 and QPS at c=1 and c=32,
the server's RSS and (on a Milvus server) Milvus's own.

Entries are BANKING77 intents many times over: entry i has the title "<intent> #i", 8 of
its intent's paraphrases with "(ref i)" appended, and an answer: 10 rows an entry. So many
entries share an intent, as a large help centre's near-duplicate entries do; what is
measured is cost, not accuracy. Questions asked are BANKING77 paraphrases.

Usage: python benchmarks/bench_scale.py [--rows 1000 10000 100000]
           [--stores lite standalone-2.3.5] [--duration 8] [--out docs/benchmarks/scale.md]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_text import BANKING, ROOT, Server, load, rss_mb, write_report  # noqa: E402
from bench_versus import cpu_flags, cpu_model  # noqa: E402

ROWS_PER_ENTRY = 10  # title, 8 paraphrases, answer
PARAPHRASES = 8
UPSERT_ENTRIES = 500  # entries per Upsert call (5,000 rows)


def intents() -> dict[str, list[str]]:
    by: dict[str, list[str]] = defaultdict(list)
    with BANKING.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by[row["category"]].append(row["text"])
    return dict(sorted(by.items()))


def entries(start: int, stop: int, by_intent: dict[str, list[str]], kb: str):
    from supportqa.v1 import supportqa_pb2 as pb

    names = list(by_intent)
    out = []
    for i in range(start, stop):
        intent = names[i % len(names)]
        qs = by_intent[intent]
        rng = np.random.default_rng(i)
        picked = [qs[j] for j in rng.choice(len(qs), PARAPHRASES, replace=False)]
        out.append(pb.Entry(
            knowledge_base=kb, id=f"e{i}", title=f"{intent.replace('_', ' ')} #{i}",
            answer=f"Answer {i}: what to do about {intent.replace('_', ' ')}.",
            questions=[f"{q} (ref {i})" for q in picked]))
    return out


def tree_rss_mb(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += rss_mb(pid)
        except OSError:
            pass
    return total


async def grow(target: str, kb: str, new) -> tuple[int, float, float, str]:
    """Upserts the new entries; returns (rows, ingest s, settle s, head state)."""
    from supportqa.client import AsyncSupportClient
    from supportqa_tools.evaluation import wait_for_head

    async with AsyncSupportClient(target, timeout=3600) as c:
        rows, t0 = 0, time.perf_counter()
        for i in range(0, len(new), UPSERT_ENTRIES):
            rows += (await c.upsert(new[i : i + UPSERT_ENTRIES])).rows
        ingest_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        state = await wait_for_head(c, kb, timeout_s=3600)
        return rows, ingest_s, time.perf_counter() - t0, state


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--stores", nargs="+", default=["lite", "standalone-2.3.5"])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per load point")
    ap.add_argument("--port", type=int, default=50398)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "scale.md"))
    args = ap.parse_args()
    by_intent = intents()
    queries = [q for qs in by_intent.values() for q in qs]
    np.random.default_rng(7).shuffle(queries)
    kb = "scale"
    results = []
    for store in args.stores:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            milvus = None
            if store != "lite":
                from supportqa_tools.milvus_server import Milvus

                milvus = Milvus(store, tmp / "milvus")
                milvus.start()
            try:
                srv = Server(tmp, args.port, **(
                    {"SUPPORTQA_MILVUS_URI": milvus.uri} if milvus else {}))
                have = 0
                for rows in sorted(args.rows):
                    new = entries(have, rows // ROWS_PER_ENTRY, by_intent, kb)
                    got_rows, ingest_s, settle_s, head = asyncio.run(grow(srv.target, kb, new))
                    have = rows // ROWS_PER_ENTRY
                    point = {"store": store, "rows": rows, "entries": have,
                             "ingest_rps": got_rows / ingest_s, "settle_s": settle_s,
                             "head": head}
                    for c in (1, 32):
                        r = asyncio.run(load(srv.target, kb, queries, c, args.duration))
                        point[c] = r
                    point["rss_mb"] = rss_mb(srv.proc.pid)
                    point["milvus_rss_mb"] = (tree_rss_mb(milvus._server_pids())
                                              if milvus else 0.0)
                    print({k: v for k, v in point.items() if k not in (1, 32)},
                          {c: (round(point[c]["rps"], 1), point[c]["latency_ms"],
                               point[c]["errors"]) for c in (1, 32)}, flush=True)
                    results.append(point)
                srv.stop()
            finally:
                if milvus is not None:
                    milvus.kill()
    lines = [
        "# Cost as the knowledge base grows",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"CPU: {cpu_model()} ({cpu_flags()}), {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; date {time.strftime('%Y-%m-%d %H:%M')}  ",
        f"One knowledge base grown step by step through Upsert ({UPSERT_ENTRIES} entries a "
        f"call, {ROWS_PER_ENTRY} rows an entry); {args.duration:g} s a load point after "
        "warm-up; the default server (speech, OCR, CLIP off). Settle: from the last write "
        "until the entry head is trained and the threshold calibrated.",
        "",
        "| store | rows | entries | ingest rows/s | settle (s) | head | c=1 p50 / p99 (ms) | "
        "c=1 QPS | c=32 p50 / p99 (ms) | c=32 QPS | errors | server RSS (MB) | "
        "Milvus RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results:
        one, many = p[1], p[32]
        errors = {**one["errors"], **many["errors"]}
        lines.append(
            f"| {p['store']} | {p['rows']} | {p['entries']} | {p['ingest_rps']:.0f} | "
            f"{p['settle_s']:.1f} | {p['head'] or '-'} | {one['latency_ms']['p50']:.1f} / "
            f"{one['latency_ms']['p99']:.1f} | {one['rps']:.1f} | "
            f"{many['latency_ms']['p50']:.1f} / {many['latency_ms']['p99']:.1f} | "
            f"{many['rps']:.1f} | {errors or '-'} | {p['rss_mb']:.0f} | "
            f"{p['milvus_rss_mb']:.0f} |")
    lines.append("")
    return write_report(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
