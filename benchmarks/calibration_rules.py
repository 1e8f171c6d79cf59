"""Offline comparison of threshold rules (docs/decisions.md, "Each knowledge base calibrates
its own threshold"): four CLINC150 knowledge bases, each measured as calibration.py does
(held-out paraphrases, the bundled out-of-scope pool, plus whole held-out entries for the
rule that uses them), then judged on CLINC150 val questions.

Usage: python benchmarks/calibration_rules.py        (cached vectors as tune_rank.py keeps them)
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_rank as T  # noqa: E402 - the sibling benchmark's loaders and BM25

BANK = ("transfer transactions balance freeze_account pay_bill bill_balance bill_due "
        "interest_rate routing min_payment order_checks pin_change report_fraud account_blocked "
        "spending_history").split()
CARD = ("credit_score report_lost_card credit_limit rewards_balance new_card application_status "
        "card_declined international_fees apr redeem_rewards credit_limit_change damaged_card "
        "replacement_card_duration improve_credit_score expiration_date").split()
GRID = np.arange(0.1, 1.0, 0.0025)


def scenario(rows_all, rv_all, queries, qv_all, pool, pv, kb_ids, oos_labels, opts):
    """Per question set (val, held-out paraphrases, whole held-out entries, pool): arrays of
    (right first, confidence)."""
    from supportqa_server.answering.head import train_head
    from supportqa_server.answering.rank import rank

    sel = [i for i, r in enumerate(rows_all) if r[0] in kb_ids]
    rows, rv = [rows_all[i] for i in sel], rv_all[sel]

    def run(krows, krv, vecs, texts, truth):
        bm = T.BM25([t for _, _, t in krows])
        head = train_head(krv, [r[0] for r in krows], c=10, texts=[t for _, _, t in krows])
        hits = T.route_hits(krows, vecs @ krv.T, texts, bm, 100)
        probs = head.probabilities(vecs, texts)
        out = []
        for (dense, lex), p, t in zip(hits, probs, truth, strict=True):
            first = rank(dense, lex, opts, head=p)[0]
            out.append((first.entry_id == t, first.score))
        return np.array(out, float)

    qi = [i for i, q in enumerate(queries) if q.label in kb_ids or q.label in oos_labels]
    val = run(rows, rv, qv_all[qi], [queries[i].text for i in qi],
              [queries[i].label if queries[i].label in kb_ids else "" for i in qi])
    is_in = np.array([queries[i].label in kb_ids for i in qi])
    rng = random.Random(1)
    entries = sorted({r[0] for r in rows})
    out_e = set(rng.sample(entries, max(1, len(entries) // 5)))
    by: dict[str, list[int]] = {}
    for j, r in enumerate(rows):
        if r[1] == "question" and r[0] not in out_e:
            by.setdefault(r[0], []).append(j)
    held = [j for ix in by.values() if len(ix) >= 3 for j in rng.sample(ix, max(1, len(ix) // 5))]
    held = rng.sample(held, min(2000, len(held)))
    loeo = [j for j, r in enumerate(rows) if r[0] in out_e and r[1] == "question"]
    loeo = rng.sample(loeo, min(1000, len(loeo)))
    keep = [j for j in range(len(rows)) if j not in set(held) and rows[j][0] not in out_e]
    asked = held + loeo
    got = run([rows[j] for j in keep], rv[keep], np.concatenate([rv[asked], pv]),
              [rows[j][2] for j in asked] + pool,
              [rows[j][0] for j in held] + [""] * (len(loeo) + len(pool)))
    n, m = len(held), len(held) + len(loeo)
    return val, is_in, got[:n], got[n:m], got[m:]


def rules(fold, loeo, pool) -> dict[str, float]:
    tpr = np.array([np.mean((fold[:, 0] == 1) & (fold[:, 1] >= t)) for t in GRID])
    tp = np.array([np.mean(pool[:, 1] < t) for t in GRID])
    tl = np.array([np.mean(loeo[:, 1] < t) for t in GRID])
    j = tpr + tp
    ok = fold[:, 1][fold[:, 0] == 1]
    return {
        "fixed 0.44": 0.44,
        "J, lowest within one pool question (shipped)":
            GRID[int(np.argmax(j >= j.max() - 1 / len(pool) - 1e-9))],
        "J, best": GRID[int(np.argmax(j))],
        "pool 90th percentile": float(np.quantile(pool[:, 1], 0.9)),
        "held-out 5th percentile": float(np.quantile(ok, 0.05)),
        "J with whole held-out entries": GRID[int(np.argmax(tpr + (tp + tl) / 2))],
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    from supportqa_server.answering.rank import RankOptions
    from supportqa_server.runtime.settings import Settings
    from supportqa_tools.evaluation import read_examples

    opts = RankOptions.from_settings(Settings())
    entries, queries, _ = T.load("clinc150")
    rows = [(e.id, kind, text) for e in entries for kind, text in e.texts()]
    rv = T.embed([t for _, _, t in rows], "", "clinc150-minilm-rows")
    qv = T.embed([q.text for q in queries], "", "clinc150-minilm-queries")
    pool = [e.text for e in read_examples(T.DATA / "clinc150" / "train_val.json", ["oos_train"])]
    pv = T.embed(pool, "", "clinc150-minilm-pool")
    ids = {r[0] for r in rows}
    # knowledge base -> its unanswerable val questions: oos, and the other domain's intents
    kbs = {"CLINC150": (ids, {"oos"}), "banking (15)": (set(BANK), set(CARD) | {"oos"}),
           "cards (15)": (set(CARD), set(BANK) | {"oos"}),
           "both (30)": (set(BANK) | set(CARD), {"oos"})}
    for name, (kb, oos) in kbs.items():
        val, is_in, fold, loeo, pl = scenario(rows, rv, queries, qv, pool, pv, kb, oos, opts)
        print(f"{name}: in-scope accuracy / NoAnswer recall on val")
        for rule, t in rules(fold, loeo, pl).items():
            acc = np.mean((val[is_in, 0] == 1) & (val[is_in, 1] >= t))
            rec = np.mean(val[~is_in, 1] < t)
            print(f"  {rule:46s} t={t:.3f}  {acc:.3f} / {rec:.3f}")


if __name__ == "__main__":
    main()
