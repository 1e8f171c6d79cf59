"""Offline experiment, not in the product: two text encoders together, and a classifier head.

On an eval split (as `supportqa-server eval` builds it), with the shipped ranking and BM25:
1. each encoder alone, and their cosines averaged with weight --mix on the second;
2. a logistic-regression head trained on the knowledge base's rows over both encoders'
   embeddings side by side, alone and added (times --head-weight) to the averaged ranking's
   entry scores.
docs/benchmarks/quality.md ("Session 5") quotes its BANKING77 figures. The head's C and weight were
chosen on dev, so the figures are optimistic. Needs scikit-learn.

Usage: python benchmarks/ensemble_head.py MODEL_A MODEL_B [--data banking77] [--mix 0.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune_rank import BM25, embed, evaluate, load, route_hits  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("models", nargs=2, help="two text models (paths or names)")
    ap.add_argument("--data", default="banking77", choices=["banking77", "clinc150"])
    ap.add_argument("--mix", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 1.0],
                    help="weights of the second model's cosine")
    ap.add_argument("--c", type=float, nargs="+", default=[10.0, 50.0], help="head's C")
    ap.add_argument("--head-weight", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from supportqa_server.answering.rank import RankOptions, rank
    from supportqa_server.runtime.settings import Settings

    entries, queries, na = load(args.data)
    rows = [(e.id, kind, text) for e in entries for kind, text in e.texts()]
    texts = [q.text for q in queries]
    gold = [q.label for q in queries]
    row_vecs, query_vecs = [], []
    for m in args.models:
        tag = f"{args.data}-{m.replace('/', '_')}"
        row_vecs.append(embed([t for _, _, t in rows], m, tag + "-rows"))
        query_vecs.append(embed(texts, m, tag + "-queries"))
    sims = [q @ r.T for q, r in zip(query_vecs, row_vecs, strict=True)]
    bm = BM25([t for _, _, t in rows])
    opts = RankOptions.from_settings(Settings())
    for w in args.mix:
        hits = route_hits(rows, (1 - w) * sims[0] + w * sims[1], texts, bm, 200, 50)
        prepared = [(q.label, d, lex, None) for q, (d, lex) in zip(queries, hits, strict=True)]
        print(f"cosines mixed, second at {w}:", evaluate(prepared, na, opts, 200), flush=True)
    hits = route_hits(rows, 0.5 * sims[0] + 0.5 * sims[1], texts, bm, 200, 50)
    ranked = [rank(d, lex, opts)[:5] for d, lex in hits]
    labels = np.array([r[0] for r in rows])
    for c in args.c:
        head = LogisticRegression(C=c, max_iter=300).fit(np.hstack(row_vecs), labels)
        probs = head.predict_proba(np.hstack(query_vecs))
        col = {e: i for i, e in enumerate(head.classes_)}
        alone = np.mean([head.classes_[i] == g for i, g in zip(probs.argmax(1), gold,
                                                                 strict=True)])
        print(f"head C={c}: accuracy@1 {alone:.4f}", flush=True)
        for hw in args.head_weight:
            acc = np.mean([
                max(r, key=lambda e, qi=qi: e.score + hw * probs[qi, col[e.entry_id]]).entry_id == g
                for qi, (r, g) in enumerate(zip(ranked, gold, strict=True))
            ])
            print(f"  + averaged ranking, head weight {hw}: accuracy@1 {acc:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
