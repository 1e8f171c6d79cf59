"""The learning thresholds, offline with the bundled MiniLM: how suggestions cluster and route
the questions a knowledge base missed (CLINC150), and how many entry pairs lint flags
(BANKING77, CLINC150).

Suggestions: a knowledge base of --known CLINC150 intents (title + --paraphrases train
utterances each); traffic of --traffic val utterances of those intents and of --absent other
intents. The questions the dense route misses (best entry wrong, or its score under
--threshold) are the log the clustering sees, as the server's Suggest would.
Usage: python benchmarks/bench_learning.py [--out docs/benchmarks/learning.md]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data" / "text"


def _clinc() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    d = json.loads((DATA / "clinc150" / "train_val.json").read_text())
    train, val = defaultdict(list), defaultdict(list)
    for text, label in d["train"]:
        train[label].append(text)
    for text, label in d["val"]:
        val[label].append(text)
    return train, val


def _banking() -> dict[str, list[str]]:
    by = defaultdict(list)
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by[row["category"]].append(row["text"])
    return by


def _rows(encoder, families: dict[str, list[str]]):
    from supportqa_server.learning.vectors import EntryRows

    ids, texts, kinds = [], [], []
    for label, qs in families.items():
        for kind, t in [("title", label.replace("_", " "))] + [("question", q) for q in qs]:
            ids.append(label)
            texts.append(t)
            kinds.append(kind)
    return EntryRows.build(ids, encoder.encode_sorted(texts), texts, kinds)


def suggestions_table(encoder, args) -> list[str]:
    from supportqa_server.knowledge.entries import EntryData
    from supportqa_server.knowledge.questions import NO_ANSWER, NOT_HELPFUL, LoggedQuestion
    from supportqa_server.learning.suggest import NEW_ENTRY, SuggestOptions, suggest
    from supportqa_server.learning.vectors import entry_scores

    train, val = _clinc()
    labels = sorted(train)
    random.Random(args.seed).shuffle(labels)
    known, absent = labels[: args.known], labels[args.known : args.known + args.absent]
    families = {k: train[k][: args.paraphrases] for k in known}
    rows = _rows(encoder, families)
    entries = {k: EntryData(id=k, answer="-", title=k.replace("_", " "), questions=tuple(v))
               for k, v in families.items()}
    asked = [(t, k) for k in known + absent for t in val[k][: args.traffic]]
    vectors = encoder.encode_sorted([t for t, _ in asked])
    scores = entry_scores(vectors, rows)
    log, truth = [], []
    for i, ((text, label), v) in enumerate(zip(asked, vectors, strict=True)):
        best = int(np.argmax(scores[i]))
        top, score = rows.entry_ids[best], float(scores[i, best])
        if top == label and score >= args.threshold:
            continue  # answered right: nothing to learn
        answered = score >= args.threshold
        log.append(LoggedQuestion(
            f"{i:032x}", "kb", text, v, "answered" if answered else NO_ANSWER, float(i),
            top=((top, score),) if answered else (), best_score=score,
            feedback=NOT_HELPFUL if answered else 0))
        truth.append(label)
    missed_known = sum(t in families for t in truth)
    out = [f"Knowledge base: {len(known)} CLINC150 intents, title + {args.paraphrases} train "
           f"utterances each ({len(rows)} rows). Traffic: {args.traffic} val utterances of each "
           f"known intent and of {len(absent)} absent intents. Logged (missed by the dense route "
           f"at threshold {args.threshold}): {missed_known} questions of known intents, "
           f"{len(log) - missed_known} of absent ones.", "",
           "| cluster distance | near | suggestions | purity | known -> right entry | "
           "known -> wrong entry | known -> new entry | absent -> new entry | absent -> an entry "
           "| ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_id = {q.request_id: t for q, t in zip(log, truth, strict=True)}
    for distance in args.distances:
        for near in args.nears:
            t0 = time.perf_counter()
            got = suggest(log, entries, rows, SuggestOptions(
                cluster_distance=distance, near=near, max_suggestions=10_000))
            ms = (time.perf_counter() - t0) * 1000
            pure = n = 0
            routed = Counter()
            for s in got:
                labels_of = Counter(by_id[r] for r in s.request_ids)
                major, count = labels_of.most_common(1)[0]
                pure += count
                n += s.asked
                if major in families:
                    routed["known_right" if s.entry_id == major else
                           "known_new" if s.kind == NEW_ENTRY else "known_wrong"] += s.asked
                else:
                    routed["absent_new" if s.kind == NEW_ENTRY else "absent_entry"] += s.asked
            absent_n = len(log) - missed_known
            out.append(
                f"| {distance} | {near} | {len(got)} | {pure / max(n, 1):.3f} | "
                f"{routed['known_right'] / max(missed_known, 1):.3f} | "
                f"{routed['known_wrong'] / max(missed_known, 1):.3f} | "
                f"{routed['known_new'] / max(missed_known, 1):.3f} | "
                f"{routed['absent_new'] / max(absent_n, 1):.3f} | "
                f"{routed['absent_entry'] / max(absent_n, 1):.3f} | {ms:.0f} |")
    out += ["", "purity: share of the suggested questions whose cluster's majority intent is "
            "theirs. The routing columns count questions (in suggestions of 2 or more) by where "
            "their cluster went, as a share of the logged questions of that kind; the rest were "
            "in clusters too small to propose."]
    return out


def lint_table(encoder, args) -> list[str]:
    from supportqa_server.learning.lint import LintOptions, centroids, lint

    train, _ = _clinc()
    out = ["| data set | entries | pairs | max centroid cosine per entry: median / p90 / max | "
           "pairs >= 0.7 / 0.8 / 0.9 | near-duplicate pairs (>= 0.9) | misplaced paraphrases "
           "| ms |", "|---|---|---|---|---|---|---|---|"]
    examples = []
    for name, families in (("CLINC150", train), ("BANKING77", _banking())):
        fam = {k: v[: args.paraphrases] for k, v in families.items()}
        rows = _rows(encoder, fam)
        cent = centroids(rows)
        sim = cent @ cent.T
        np.fill_diagonal(sim, -1)
        upper = sim[np.triu_indices(len(sim), 1)]
        best = sim.max(axis=1)
        t0 = time.perf_counter()
        report = lint(rows, LintOptions(max_findings=100_000))
        ms = (time.perf_counter() - t0) * 1000
        near_dup = sum(p.text_similarity >= 0.9 for p in report.confusable)
        n_para = sum(k == "question" for k in rows.kinds)
        out.append(
            f"| {name} | {len(fam)} | {len(upper)} | {np.median(best):.2f} / "
            f"{np.quantile(best, 0.9):.2f} / {best.max():.2f} | "
            f"{(upper >= 0.7).sum()} / {(upper >= 0.8).sum()} / {(upper >= 0.9).sum()} | "
            f"{near_dup} | {len(report.misplaced)} of {n_para} | {ms:.0f} |")
        for p in report.confusable[:4]:
            examples.append(f"- {name}: `{p.entry_a}` / `{p.entry_b}`: centroids "
                            f"{p.similarity:.2f}; closest texts {p.text_similarity:.2f} "
                            f"(\"{p.text_a}\" / \"{p.text_b}\")")
    return out + ["", "The most confusable pairs lint reports:", "", *examples]


def lint_timing(rows_n: int = 20_000, per_entry: int = 10, dim: int = 384) -> list[str]:
    """lint's time at the most rows it reads (pipeline.LINT_MAX_ROWS), on random clustered
    vectors: its cost depends on the row count, not on the texts."""
    from supportqa_server.learning.lint import lint
    from supportqa_server.learning.vectors import EntryRows, unit

    rng = np.random.default_rng(0)
    n_entries = rows_n // per_entry
    centres = rng.standard_normal((n_entries, dim)).astype(np.float32)
    vectors = unit(np.repeat(centres, per_entry, axis=0)
                   + 0.5 * rng.standard_normal((rows_n, dim)).astype(np.float32))
    ids = [f"e{i}" for i in range(n_entries) for _ in range(per_entry)]
    kinds = (["title"] + ["question"] * (per_entry - 1)) * n_entries
    rows = EntryRows.build(ids, vectors, [f"t{i}" for i in range(rows_n)], kinds)
    t0 = time.perf_counter()
    lint(rows)
    return [f"lint of {rows_n:,} rows ({n_entries:,} entries, {rows_n - n_entries:,} "
            f"paraphrases), random {dim}-d vectors: {time.perf_counter() - t0:.1f} s."]


async def _serve_ab(args) -> list[str]:
    """Ask latency and throughput with the question log on and off: two servers in this
    process, the sample knowledge base, turns alternating."""
    import statistics
    import tempfile

    from supportqa.client import AsyncSupportClient
    from supportqa.knowledge_file import read_entries
    from supportqa_server.api.server import running_server
    from supportqa_server.runtime.settings import Settings

    questions = [e.questions[-1] for e in read_entries(ROOT / "knowledge" / "sample.jsonl")]
    questions = [q + " please" for q in questions]
    lat: dict[bool, list[float]] = {True: [], False: []}
    qps: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as d_on, tempfile.TemporaryDirectory() as d_off:
        def settings(d, on):
            return Settings(port=0, data_dir=Path(d), speech_model="", clip_model="",
                            ocr=False, question_log=on, metrics_port=0, max_queue_ms=0)
        async with running_server(settings(d_on, True)) as on, \
                running_server(settings(d_off, False)) as off:
            clients = {}
            for flag, target in ((True, on), (False, off)):
                clients[flag] = AsyncSupportClient(target, timeout=60)
                await clients[flag].upsert(read_entries(ROOT / "knowledge" / "sample.jsonl"))
                for q in questions[:10]:
                    await clients[flag].ask(q)
            for _ in range(args.turns):
                for flag in (True, False):
                    c = clients[flag]
                    for q in questions:
                        t0 = time.perf_counter()
                        await c.ask(q)
                        lat[flag].append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    await asyncio.gather(*(c.ask(q) for q in questions * 4))
                    qps[flag].append(4 * len(questions) / (time.perf_counter() - t0))
            for c in clients.values():
                await c.close()
    out = ["| question log | Ask latency, one caller: median / p90 (ms) | QPS, "
           f"{4 * len(questions)} Asks at once: median of {args.turns} turns |", "|---|---|---|"]
    for flag in (True, False):
        xs = sorted(lat[flag])
        out.append(f"| {'on' if flag else 'off'} | {statistics.median(xs):.1f} / "
                   f"{xs[int(0.9 * len(xs))]:.1f} | {statistics.median(qps[flag]):.0f} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--known", type=int, default=40)
    ap.add_argument("--absent", type=int, default=20)
    ap.add_argument("--paraphrases", type=int, default=10)
    ap.add_argument("--traffic", type=int, default=10, help="val questions per intent")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--distances", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--nears", type=float, nargs="+", default=[0.35, 0.4, 0.45, 0.5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--turns", type=int, default=4, help="alternating turns of the A/B")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "learning.md"))
    args = ap.parse_args()
    from bench_text import write_report
    from supportqa_server.runtime.encoder import TextEncoder

    encoder = TextEncoder("", "cpu", "float32")
    lines = ["# Learning from traffic: suggestions and lint", "",
             "`python benchmarks/bench_learning.py` (offline, bundled all-MiniLM-L6-v2, float32; "
             "the dense route's scores only: no BM25, no entry head).", "",
             "## Suggestions (CLINC150)", "", *suggestions_table(encoder, args), "",
             "## Lint (title + 10 paraphrases per intent)", "", *lint_table(encoder, args), "",
             *lint_timing(), "",
             "## The question log on the answer path", "",
             "The sample knowledge base through the server (bfloat16 where the CPU has it), "
             "each sample entry's last paraphrase + \" please\"; two servers in one process, "
             "turns alternating.", "", *asyncio.run(_serve_ab(args)), ""]
    return write_report(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
