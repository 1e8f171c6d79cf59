"""Offline sweep of ranking options: embed a data set once, then replay `rank()` per option set.

Dense search is exact inner product over unit vectors, as the store's FLAT index does; the
lexical route is a BM25 (k1=1.2, b=0.75, lower-cased word tokens) like Milvus's standard
analyzer. The numbers this prints steer the choice; the reported ones come from
`supportqa-server eval`.

Usage:
    python benchmarks/tune_rank.py banking77 [--model DIR] [--rows 200,1000] [--configs NAME,...]
    python benchmarks/tune_rank.py banking77 --runtime onnx-int8 [--query-runtime torch]
    python benchmarks/tune_rank.py clinc150 [--model DIR]
    python benchmarks/tune_rank.py banking77 --lexical --head 10 --per-entry 4 \
        --grid '{f"w{w}": replace(S, head_weight=w) for w in (0, 0.5)}'   # the entry head
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text"
CACHE = ROOT / ".cache" / "tune"
_TOKEN = re.compile(r"\w+", re.UNICODE)


NEUTRAL = dict(aggregation="max", top_rows=2, knn=10, knn_temperature=0.05, fusion="rrf",
               lexical_weight=0.0, confidence="best", margin_weight=0.0, head_weight=0.0,
               head_confidence=0.0)


def load(name: str, seed: int = 13, kb_file: str = "", kb_splits=(), q_splits=()):
    """(entries as EntryData, queries as Example, no-answer label) exactly as `eval` builds them."""
    from supportqa_server.knowledge.store import EntryData
    from supportqa_tools.evaluation import build_dataset, build_entries, read_examples

    if name == "banking77":
        ex = read_examples(DATA / "banking77" / "train.csv")
        ds = build_dataset(ex, ex, same_source=True, dev_fraction=0.2, seed=seed)
        na = None
    elif name == "clinc150":
        path = DATA / "clinc150" / "train_val.json"
        kb = read_examples(path, list(kb_splits or ["train"]))
        qs = read_examples(path, list(q_splits or ["val", "oos_val"]))
        na = "oos"
        ds = build_dataset(kb, qs, same_source=False, no_answer_label=na, seed=seed)
    else:
        raise SystemExit(f"unknown data set {name!r}")
    entries = [
        EntryData(id=e.id, answer=e.answer, title=e.title, questions=tuple(e.questions))
        for e in build_entries(ds.kb, "eval")
    ]
    return entries, ds.queries, na


def embed(texts: list[str], model: str, tag: str, runtime: str = "torch") -> np.ndarray:
    """Vectors of texts, cached per model, runtime (bench_encoder.make_encoder's names;
    "torch": TextEncoder at SUPPORTQA_PRECISION auto) and texts."""
    from supportqa_server.runtime.encoder import TextEncoder

    key = hashlib.sha1(("\n".join(texts) + "\0" + model).encode()).hexdigest()[:16]
    if runtime != "torch":
        tag = f"{tag}-{runtime}"
    path = CACHE / f"{tag}-{key}.npy"
    if path.exists():
        return np.load(path)
    if runtime == "torch":
        enc = TextEncoder(model)
    else:
        from bench_encoder import make_encoder  # benchmarks/, this script's folder

        enc = make_encoder(runtime, model, CACHE / "onnx")
    t0 = time.perf_counter()
    vecs = enc.encode_sorted(texts)
    print(f"embedded {len(texts)} texts in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    return vecs


class BM25:
    """Okapi BM25 over the row texts (Milvus defaults k1=1.2, b=0.75)."""

    def __init__(self, docs: list[str], k1: float = 1.2, b: float = 0.75) -> None:
        self.toks = [Counter(_TOKEN.findall(d.lower())) for d in docs]
        self.lens = np.array([sum(t.values()) for t in self.toks], dtype=np.float64)
        self.avg = float(self.lens.mean())
        self.k1, self.b = k1, b
        self.post: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, t in enumerate(self.toks):
            for w, c in t.items():
                self.post[w].append((i, c))
        n = len(docs)
        self.idf = {
            w: math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)) for w, p in self.post.items()
        }

    def search(self, query: str, limit: int) -> list[tuple[int, float]]:
        scores: dict[int, float] = defaultdict(float)
        for w in set(_TOKEN.findall(query.lower())):
            for i, c in self.post.get(w, ()):
                norm = self.k1 * (1 - self.b + self.b * self.lens[i] / self.avg)
                scores[i] += self.idf[w] * c * (self.k1 + 1) / (c + norm)
        return sorted(scores.items(), key=lambda kv: -kv[1])[:limit]


def prepare(name: str, model: str, max_rows: int, lexical: bool, head_c: float = 0.0,
            per_entry: int = 0, head_words: bool = True, runtime: str = "torch",
            query_runtime: str = ""):
    """Per query: (label, dense RowHits best first, lexical RowHits best first, entry head
    probabilities or None); with head_c, the head (head.py) is trained on the rows' vectors.
    runtime embeds the rows, query_runtime (default the same) the questions: a knowledge base
    written by one runtime and asked through another.
    per_entry > 0 keeps that many paraphrases of each entry (at random; its title and answer
    stay), as a knowledge base with fewer paraphrases would be."""
    entries, queries, na = load(name)
    rows = [(e.id, kind, text) for e in entries for kind, text in e.texts()]
    tag = f"{name}-{Path(model).name or 'minilm'}"
    rv = embed([t for _, _, t in rows], model, tag + "-rows", runtime)
    if per_entry:
        rng = random.Random(per_entry)
        questions: dict[str, list[int]] = defaultdict(list)
        for i, (e, kind, _) in enumerate(rows):
            if kind == "question":
                questions[e].append(i)
        drop = {i for idx in questions.values() if len(idx) > per_entry
                for i in set(idx) - set(rng.sample(idx, per_entry))}
        keep = [i for i in range(len(rows)) if i not in drop]
        rows, rv = [rows[i] for i in keep], rv[keep]
    qv = embed([q.text for q in queries], model, tag + "-queries", query_runtime or runtime)
    bm = BM25([t for _, _, t in rows]) if lexical else None
    hits = route_hits(rows, qv @ rv.T, [q.text for q in queries], bm, max_rows)
    heads = [None] * len(queries)
    if head_c:
        from supportqa_server.answering.head import train_head

        t0 = time.perf_counter()
        head = train_head(rv, [r[0] for r in rows], c=head_c,
                          texts=[t for _, _, t in rows] if head_words else None)
        print(f"head C={head_c} trained in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        heads = head.probabilities(qv, [q.text for q in queries])
    return [(q.label, dense, lex, h)
            for q, (dense, lex), h in zip(queries, hits, heads, strict=True)], na


def route_hits(rows, sims: np.ndarray, texts: list[str], bm: BM25 | None, k: int,
               lexical_k: int | None = None):
    """Per question, (dense RowHits, BM25 RowHits) best first, as the store returns them.

    rows: (entry_id, kind, text) per row; sims: (Q, R) cosines of the questions to the rows.
    """
    from supportqa_server.knowledge.store import RowHit

    k = min(k, len(rows))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    out = []
    for qi, text in enumerate(texts):
        idx = top[qi][np.argsort(-sims[qi, top[qi]])]
        dense = [RowHit(rows[i][0], rows[i][1], rows[i][2], float(sims[qi, i])) for i in idx]
        lex = (
            [RowHit(rows[i][0], rows[i][1], rows[i][2], s)
             for i, s in bm.search(text, lexical_k or k)]
            if bm else []
        )
        out.append((dense, lex))
    return out


def evaluate(prepared, na, opts, rows: int, threshold: float | None = None) -> dict:
    from supportqa_server.answering.rank import rank
    from supportqa_tools.evaluation import (
        Outcome,
        apply_threshold,
        compute_metrics,
        sweep_thresholds,
        threshold_grid,
    )

    outcomes = []
    t0 = time.perf_counter()
    for label, dense, lex, head in prepared:
        ranked = rank(dense[:rows], lex[:rows], opts, head=head)[:5]
        outcomes.append(Outcome(label, tuple(r.entry_id for r in ranked),
                                tuple(r.score for r in ranked), latency_ms=0.0))
    ms = (time.perf_counter() - t0) * 1000 / len(prepared)
    m = compute_metrics(outcomes, na)
    res = {"acc": m["accuracy_at_1"], "r5": m["recall_at_5"], "mrr": m["mrr"], "rank_ms": ms}
    if threshold is not None:
        at = compute_metrics(apply_threshold(outcomes, threshold), na)
        res |= {f"acc@{threshold}": at["accuracy_at_1"]}
        if na:
            res |= {"na_p": at["no_answer_precision"], "na_r": at["no_answer_recall"],
                    "na_f1": at["no_answer_f1"]}
    if na:
        grid = threshold_grid([o.scores[0] for o in outcomes], 0.005)
        sweep = sweep_thresholds(outcomes, grid, na)
        best = max(sweep, key=lambda r: (r["no_answer_f1"] or 0.0, r["in_scope_accuracy"]))
        res |= {"f1_thr": best["threshold"], "f1": best["no_answer_f1"],
                "f1_acc": best["in_scope_accuracy"], "f1_rec": best["no_answer_recall"],
                "f1_prec": best["no_answer_precision"]}
        ok = [r for r in sweep if r["no_answer_recall"] >= 0.70]
        at = min(ok, key=lambda r: r["threshold"]) if ok else None
        if at:
            res |= {"r70_thr": at["threshold"], "r70_acc": at["in_scope_accuracy"],
                    "r70_prec": at["no_answer_precision"]}
        # Threshold-free separability: AUROC of the top score, oos vs in-scope.
        pos = np.array([o.scores[0] for o in outcomes if o.label == na])
        neg = np.array([o.scores[0] for o in outcomes if o.label != na])
        res["auroc"] = float((neg[:, None] > pos[None, :]).mean()
                             + 0.5 * (neg[:, None] == pos[None, :]).mean())
    return res


def cost(name: str, model: str, data_dir: str, n: int, grid: dict) -> None:
    """Milliseconds per question of the store's search (dense alone, + BM25; 200 and 1000
    rows) and of rank() per option set, on the eval store in data_dir (no server running)."""
    from supportqa_server.answering.rank import rank
    from supportqa_server.knowledge.store import KnowledgeStore

    entries, queries, _ = load(name)
    tag = f"{name}-{Path(model).name or 'minilm'}"
    qv = embed([q.text for q in queries], model, tag + "-queries")[:n]
    texts = [q.text for q in queries[:n]]
    store = KnowledgeStore(str((Path(data_dir) / "milvus.db").resolve()), qv.shape[1])
    store.open()
    try:
        for limit in (200, 1000):
            for lexical in (False, True):
                store.search("eval", qv[:1], texts[:1], limit=limit, lexical=lexical)  # warm
                t0 = time.perf_counter()
                found = [store.search("eval", qv[i : i + 1], texts[i : i + 1], limit=limit,
                                      lexical=lexical)[0] for i in range(n)]
                ms = (time.perf_counter() - t0) * 1000 / n
                print(f"search rows={limit} bm25={lexical}: {ms:.2f} ms/question")
            for label, opts in grid.items():
                t0 = time.perf_counter()
                for dense, lex in found:
                    rank(dense, lex if opts.lexical_weight > 0 else [], opts)
                ms = (time.perf_counter() - t0) * 1000 / n
                print(f"rank rows={limit} {label}: {ms:.3f} ms/question")
    finally:
        store.close()


def main() -> None:
    from supportqa_server.answering.rank import RankOptions
    from supportqa_server.runtime.settings import Settings

    p = argparse.ArgumentParser()
    p.add_argument("dataset", choices=["banking77", "clinc150"])
    p.add_argument("--model", default="")
    p.add_argument("--rows", default="200,1000")
    p.add_argument("--lexical", action="store_true")
    p.add_argument("--grid", default="agg")
    p.add_argument("--threshold", type=float, help="also score with this NoAnswer threshold")
    p.add_argument("--cost", metavar="DATA_DIR", help="time search and rank() on an eval store")
    p.add_argument("--n", type=int, default=300, help="questions timed by --cost")
    p.add_argument("--head", type=float, default=0.0, metavar="C",
                   help="train the entry head with this C (grid options set head_weight)")
    p.add_argument("--no-head-words", action="store_true",
                   help="the head reads vectors only (before session 8)")
    p.add_argument("--per-entry", type=int, default=0,
                   help="keep this many paraphrases per entry in the knowledge base")
    p.add_argument("--runtime", default="torch",
                   help="encoder of the rows: torch, onnx-float32, onnx-int8, torch-int8 or a "
                        "variant of benchmarks/bench_encoder.py")
    p.add_argument("--query-runtime", default="", help="encoder of the questions; default "
                   "--runtime's")
    args = p.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    grid: dict[str, RankOptions] = {}

    def R(**kw) -> RankOptions:  # noqa: N802 - the grid's shorthand for RankOptions
        """Options with the neutral base (best row, dense only, no head) under ``kw``."""
        return RankOptions(**(NEUTRAL | kw))

    if args.grid == "agg":
        grid["max"] = R()
        for t in (2, 3, 5):
            grid[f"mean_top{t}"] = R(aggregation="mean_top", top_rows=t)
        for k in (5, 10, 20, 40):
            for temp in (0.02, 0.05, 0.1):
                grid[f"knn{k}_t{temp}"] = R(aggregation="knn", knn=k, knn_temperature=temp)
    elif args.grid == "lex":
        grid["dense"] = R()
        for w in (0.1, 0.25, 0.5, 1.0):
            grid[f"rrf_w{w}"] = R(lexical_weight=w)
        for w in (0.02, 0.05, 0.1, 0.2):
            grid[f"score_w{w}"] = R(fusion="score", lexical_weight=w)
        grid["lex_only"] = R(lexical_weight=1e6)
    elif args.grid == "conf":
        for agg in (R(), R(aggregation="mean_top"), R(aggregation="knn", knn_temperature=0.1)):
            for conf in ("best", "mean_top"):
                for top in (2, 3):
                    for mw in (0.0, 0.5, 1.0):
                        grid[f"{agg.aggregation}/{conf}{top}/m{mw}"] = dataclasses.replace(
                            agg, confidence=conf, top_rows=top, margin_weight=mw)
    else:
        # R: RankOptions; S: the shipped options; replace: dataclasses.replace
        env = {"R": R, "S": RankOptions.from_settings(Settings()), "replace": dataclasses.replace}
        grid = dict(eval(args.grid, env))  # noqa: S307 - a developer's own expression
    if args.cost:
        cost(args.dataset, args.model, args.cost, args.n, grid)
        return
    prepared, na = prepare(args.dataset, args.model, max(rows_list), args.lexical, args.head,
                           args.per_entry, not args.no_head_words, args.runtime,
                           args.query_runtime)
    for rows in rows_list:
        for name, opts in grid.items():
            res = evaluate(prepared, na, opts, rows, args.threshold)
            print(f"rows={rows:<5} {name:<18} " + " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
            ), flush=True)


if __name__ == "__main__":
    main()
