"""Articles: what a help-centre knowledge base costs beside an intent-style one, in one run on
one server. Ingest of a 1 MB Markdown article (passages/s), and Ask at c=1 and c=8 on the
StackFAQ threads loaded as articles against the sample intent knowledge base.

Usage: python benchmarks/bench_articles.py [--duration 10] [--out docs/benchmarks/articles.md]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overload import SAMPLE_KB, cpu_model, questions  # noqa: E402
from bench_text import Server, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STACKFAQ = ROOT.parent / "shared" / "data" / "text" / "stackfaq" / "stackExchange-FAQ.json"


def big_article(target_bytes: int = 1_000_000) -> str:
    """A Markdown manual of ~target_bytes: chapters, sections, paragraphs and lists."""
    para = ("To change this setting, open the account page, choose the section it belongs to "
            "and save; the change applies to every device within a minute. ")
    parts, chapter = ["# Product manual\n"], 0
    while sum(map(len, parts)) < target_bytes:
        chapter += 1
        parts.append(f"## Chapter {chapter}\n")
        for s in range(5):
            parts.append(f"### Setting {chapter}.{s}\n\n{para * 4}\n\n- first step\n- second "
                         "step\n")
    return "\n".join(parts)


async def measure(target: str, args: argparse.Namespace) -> list[str]:
    from supportqa.bench import run_load
    from supportqa.client import AsyncSupportClient, question
    from supportqa.knowledge_file import read_entries
    from supportqa_tools.faq import faq_entries, read_faq

    articles, queries = read_faq(STACKFAQ)
    async with AsyncSupportClient(target, timeout=600) as c:
        await c.upsert(read_entries(SAMPLE_KB))
        await c.upsert(faq_entries(articles, "help", "article"))
        body = big_article()
        t0 = time.perf_counter()
        summary = await c.upsert([{"knowledge_base": "manual", "id": "manual.md",
                                   "body": body, "body_format": "markdown"}])
        ingest_s = time.perf_counter() - t0
    lines = [
        "# Articles: cost beside intents",
        "",
        f"`python benchmarks/bench_articles.py --duration {args.duration:g}` on {cpu_model()}, "
        "one text-only server (float32), both knowledge bases in it, measured in one run.",
        "",
        f"Ingest of one {len(body.encode()) / 1e6:.2f} MB Markdown article: {summary.rows} "
        f"passages in {ingest_s:.1f} s ({summary.rows / ingest_s:.0f} passages/s, split, "
        "embedded and written).",
        "",
        "| knowledge base | entries | rows | concurrency | QPS | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    async with AsyncSupportClient(target) as c:
        rows = {kb.name: kb for kb in (await c.stats()).knowledge_bases}
    kinds = {"default": [question(q, top_k=3) for q in questions()],
             "help": [question(q.text, knowledge_base="help", top_k=3) for q in queries]}
    results = {}
    for conc in args.concurrency:
        for kb, qs in kinds.items():
            r = await run_load(target, questions=qs, concurrency=conc,
                               duration_s=args.duration, timeout=30.0, warmup=32)
            results[(kb, conc)] = r
            lat = r["latency_ms"]
            lines.append(f"| {kb} ({'intents' if kb == 'default' else 'StackFAQ articles'}) "
                         f"| {rows[kb].entries} | {rows[kb].rows} | {conc} | {r['rps']:.1f} | "
                         f"{lat['p50']:.1f} | {lat['p99']:.1f} |")
    lines += ["", "Articles against intents, same run:"]
    for conc in args.concurrency:
        a, i = results[("help", conc)], results[("default", conc)]
        lines.append(f"- c={conc}: {a['rps'] / i['rps']:.2f}x the QPS, "
                     f"{a['latency_ms']['p50'] / i['latency_ms']['p50']:.2f}x the p50")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "articles.md"))
    ap.add_argument("--port", type=int, default=50393)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-articles-") as data:
        server = Server(Path(data), args.port)
        try:
            lines = asyncio.run(measure(server.target, args))
        finally:
            server.stop()
    return write_report(args.out, lines)


if __name__ == "__main__":
    raise SystemExit(main())
