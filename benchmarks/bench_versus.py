"""The default server today against the server at an earlier commit, on the same machine in one
run: c=1 and c=32 QPS and latency on one 10k-row knowledge base, and held-out accuracy.

Both servers run as subprocesses from this venv; the earlier one from its own source tree
(`git archive`), each on a fresh data folder, one at a time (2 cores: a second idle server
would still take CPU). Load points alternate between them over --rounds rounds, so a drift of
the machine's speed lands on both; the medians are compared.

Knowledge bases (both ingested through the API by each server):
- "banking": BANKING77 train whole (77 entries, ~10.2k rows); the load asks its paraphrases.
- "heldout": BANKING77 train without 20% of each intent's paraphrases (seed 13); those are
  asked once at c=8 and scored top-1 (accuracy@1), the no-answer threshold left out of it.

Usage: python benchmarks/bench_versus.py [--base f3f948d] [--duration 10] [--rounds 2]
           [--out docs/benchmarks/versus.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_text import ROOT, Server, banking_entries, load, rss_mb, write_report  # noqa: E402

HELD_OUT = 0.2  # of each intent's paraphrases, asked as the held-out questions
SEED = 13


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def held_out_split(entries, seed: int = SEED):
    """(knowledge base entries without the held-out paraphrases, [(question, entry id)])."""
    from supportqa.v1 import supportqa_pb2 as pb

    rng = np.random.default_rng(seed)
    kb, asked = [], []
    for e in entries:
        qs = list(e.questions)
        held = set(rng.permutation(len(qs))[: int(len(qs) * HELD_OUT)].tolist())
        kb.append(pb.Entry(knowledge_base="heldout", id=e.id, title=e.title, answer=e.answer,
                           questions=[q for i, q in enumerate(qs) if i not in held]))
        asked += [(qs[i], e.id) for i in sorted(held)]
    return kb, asked


async def accuracy(target: str, asked: list[tuple[str, str]], concurrency: int = 8) -> dict:
    """Top-1 accuracy of the held-out questions (the first ranked entry, confident or not)."""
    from supportqa.client import AsyncSupportClient

    right, failed = 0, 0
    sem = asyncio.Semaphore(concurrency)
    async with AsyncSupportClient(target, timeout=60) as c:
        async def one(q: str, want: str) -> None:
            nonlocal right, failed
            async with sem:
                try:
                    a = await c.ask(q, knowledge_base="heldout", top_k=1, min_score=0.0)
                except Exception:  # noqa: BLE001 - counted: an error is a miss
                    failed += 1
                    return
                right += bool(a.answers) and a.answers[0].entry_id == want

        await asyncio.gather(*(one(q, want) for q, want in asked))
    return {"accuracy": right / len(asked), "errors": failed, "n": len(asked)}


def ingest(srv: Server, entries, heldout_kb) -> dict:
    from supportqa.client import SupportClient

    out = {}
    with SupportClient(srv.target, timeout=1800) as c:
        for name, batch in (("banking", entries), ("heldout", heldout_kb)):
            t0 = time.perf_counter()
            reply = c.upsert(batch)
            out[name] = (reply.rows, time.perf_counter() - t0)
    t0 = time.perf_counter()
    srv.settle()
    out["settle_s"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", default="f3f948d", help="the earlier commit")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of load points")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--port", type=int, default=50397)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "versus.md"))
    args = ap.parse_args()
    entries, texts = banking_entries("banking")
    heldout_kb, asked = held_out_split(entries)
    rng = np.random.default_rng(7)
    queries = [texts[i] for i in rng.permutation(len(texts))]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    labels = {"base": f"{args.base} (before)", "now": f"{head} (default today)"}
    results: dict[tuple[str, int], list[dict]] = defaultdict(list)
    notes: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "base-tree"
        source.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "server",
                                  "clients"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        for name in ("base", "now"):  # ingest each once; the data folders are kept
            (tmp / name).mkdir()
            srv = Server(tmp / name, args.port, source if name == "base" else None)
            notes[name] = {"start_s": srv.start_s, **ingest(srv, entries, heldout_kb)}
            notes[name]["accuracy"] = asyncio.run(accuracy(srv.target, asked))
            print(name, notes[name], flush=True)
            srv.stop()
        for r in range(args.rounds):
            for name in (("base", "now") if r % 2 == 0 else ("now", "base")):
                srv = Server(tmp / name, args.port, source if name == "base" else None)
                for c in args.concurrency:
                    got = asyncio.run(load(srv.target, "banking", queries, c, args.duration))
                    results[(name, c)].append(got)
                    print(r, name, c, round(got["rps"], 1), got["latency_ms"], got["errors"],
                          flush=True)
                notes[name]["rss_mb"] = rss_mb(srv.proc.pid)
                srv.stop()

    def med(name: str, c: int, key: str) -> float:
        runs = results[(name, c)]
        vals = [x["rps"] if key == "rps" else x["latency_ms"][key] for x in runs]
        return statistics.median(vals)

    lines = [
        "# Today's server against an earlier commit",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"CPU: {cpu_model()} ({cpu_flags()}), {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; date {time.strftime('%Y-%m-%d %H:%M')}  ",
        f"Knowledge base `banking`: BANKING77 train, {len(entries)} entries, "
        f"{notes['now']['banking'][0]} rows. Load: `supportqa.bench.run_load` in this process, "
        f"each server in its own; {args.duration:g} s a point after warm-up, {args.rounds} "
        "alternating rounds, medians below. Both servers with their defaults (speech, OCR and "
        "CLIP off).",
        "",
        "| | " + " | ".join(labels[n] for n in ("base", "now")) + " | now / before |",
        "|---|---|---|---|",
    ]

    def row(what: str, b: float, n: float, fmt: str = "{:.1f}") -> str:
        return f"| {what} | {fmt.format(b)} | {fmt.format(n)} | {n / b:.2f}x |"

    for c in args.concurrency:
        lines.append(row(f"c={c} QPS", med("base", c, "rps"), med("now", c, "rps")))
        lines.append(row(f"c={c} p50 (ms)", med("base", c, "p50"), med("now", c, "p50")))
        lines.append(row(f"c={c} p99 (ms)", med("base", c, "p99"), med("now", c, "p99")))
    errors = {n: sum(sum(x["errors"].values()) for c in args.concurrency
                     for x in results[(n, c)]) for n in ("base", "now")}
    acc = {n: notes[n]["accuracy"] for n in ("base", "now")}
    lines += [
        f"| errors in the load points | {errors['base']} | {errors['now']} | |",
        f"| held-out accuracy@1 ({acc['now']['n']} BANKING77 paraphrases, c=8) | "
        f"{acc['base']['accuracy']:.4f} | {acc['now']['accuracy']:.4f} | "
        f"{acc['now']['accuracy'] - acc['base']['accuracy']:+.4f} |",
        row("ingest, rows/s (banking, embedding included)",
            notes["base"]["banking"][0] / notes["base"]["banking"][1],
            notes["now"]["banking"][0] / notes["now"]["banking"][1], "{:.0f}"),
        row("start-up to SERVING, first start (s)", notes["base"]["start_s"],
            notes["now"]["start_s"]),
        row("RSS after the load (MB)", notes["base"]["rss_mb"], notes["now"]["rss_mb"],
            "{:.0f}"),
        "",
    ]
    if 1 in args.concurrency and 32 in args.concurrency:
        b32, n32 = med("base", 32, "rps"), med("now", 32, "rps")
        lines += [
            "## Against issue 29's targets",
            "",
            "| target | measured |",
            "|---|---|",
            f"| c=32 QPS >= 2x before | {n32 / b32:.2f}x |",
            f"| c=1 p50 <= 0.7x before | {med('now', 1, 'p50') / med('base', 1, 'p50'):.2f}x |",
            f"| no errors | {errors['now']} |",
            f"| held-out accuracy unchanged | {acc['now']['accuracy']:.4f} against "
            f"{acc['base']['accuracy']:.4f} |",
            f"| c=32 QPS >= 3x c=1 | {n32 / med('now', 1, 'rps'):.2f}x |",
            "",
        ]
    return write_report(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
