"""Ranking: rows to entries, routes fused into one list, a confidence for the NoAnswer decision."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .store import RowHit

DENSE, LEXICAL, READ, SEE = "dense", "lexical", "read", "see"


@dataclass(frozen=True)
class RankOptions:
    """How rows become a ranked entry list."""

    # How an entry's dense rows score it: "max" (best row), "mean_top" (mean of its best
    # `top_rows` rows), "knn" (similarity-weighted vote of the best `knn` rows overall).
    aggregation: str = "max"
    top_rows: int = 2  # rows averaged by "mean_top"
    knn: int = 10  # neighbours voting in "knn"
    knn_temperature: float = 0.05  # softmax temperature of the kNN vote, cosine units
    rrf_k: float = 60.0  # reciprocal-rank-fusion constant (Cormack et al. 2009)
    lexical_weight: float = 0.0  # weight of the BM25 route in the fused rank; 0: dense only
    margin_weight: float = 0.0  # confidence bonus per unit of top1-top2 cosine gap


@dataclass
class RankedEntry:
    entry_id: str
    score: float  # confidence in [0, 1]
    fused: float  # ranking key
    routes: set[str] = field(default_factory=set)
    matched_text: str = ""


def _dense_scores(hits: Sequence[RowHit], opts: RankOptions) -> dict[str, float]:
    by_entry: dict[str, list[float]] = defaultdict(list)
    for h in hits:
        by_entry[h.entry_id].append(h.score)
    if opts.aggregation == "max":
        return {e: max(s) for e, s in by_entry.items()}
    if opts.aggregation == "mean_top":
        return {
            e: sum(sorted(s, reverse=True)[: opts.top_rows]) / min(len(s), opts.top_rows)
            for e, s in by_entry.items()
        }
    if opts.aggregation == "knn":
        best = {e: max(s) for e, s in by_entry.items()}
        top = sorted(hits, key=lambda h: -h.score)[: opts.knn]
        if not top:
            return {}
        m = top[0].score
        votes: dict[str, float] = defaultdict(float)
        for h in top:
            votes[h.entry_id] += math.exp((h.score - m) / opts.knn_temperature)
        total = sum(votes.values())
        # Rank by vote share; keep the cosine of the entry's best row as its confidence scale
        # by mixing: entries without votes keep their cosine, shrunk below any voted entry.
        return {
            e: (1.0 + votes[e] / total) if e in votes else best[e] - 1.0 for e in best
        }
    raise ValueError(f"aggregation {opts.aggregation!r} is not one of max, mean_top, knn")


def rank(
    dense: Sequence[RowHit],
    lexical: Sequence[RowHit],
    opts: RankOptions,
    *,
    extra_routes: Sequence[str] = (),
) -> list[RankedEntry]:
    """Fuses the dense and lexical row hits of one question into entries, best first.

    The confidence of an entry is the cosine of its best dense row (clipped to [0, 1]),
    plus an optional margin bonus for the top entry; fusion only reorders.
    """
    best_row: dict[str, RowHit] = {}
    for h in dense:
        if h.entry_id not in best_row or h.score > best_row[h.entry_id].score:
            best_row[h.entry_id] = h
    dense_key = _dense_scores(dense, opts)
    dense_order = sorted(dense_key, key=lambda e: -dense_key[e])
    lex_order: list[str] = []
    for h in lexical:
        if h.entry_id not in lex_order:
            lex_order.append(h.entry_id)
    fused: dict[str, float] = defaultdict(float)
    for r, e in enumerate(dense_order):
        fused[e] += 1.0 / (opts.rrf_k + r + 1)
    if opts.lexical_weight > 0:
        for r, e in enumerate(lex_order):
            fused[e] += opts.lexical_weight / (opts.rrf_k + r + 1)
    lex_set = set(lex_order[:50])
    out = []
    for e, f in fused.items():
        row = best_row.get(e)
        conf = max(0.0, min(1.0, row.score)) if row else 0.0
        routes = {DENSE} if row else set()
        if e in lex_set:
            routes.add(LEXICAL)
        routes.update(extra_routes)
        out.append(RankedEntry(e, conf, f, routes, row.text if row else ""))
    out.sort(key=lambda r: (-r.fused, -r.score))
    if opts.margin_weight and len(out) >= 2:
        gap = max(0.0, out[0].score - out[1].score)
        out[0].score = min(1.0, out[0].score + opts.margin_weight * gap)
    return out


def fuse_lists(lists: Sequence[tuple[float, list[RankedEntry]]]) -> list[RankedEntry]:
    """Fuses the ranked lists of one question's routes (typed text, text read from the image,
    the image itself) by the weighted sum of their confidences (CombSUM).

    An entry missing from a list counts with that list's lowest confidence, so an entry that
    matches every part of the question beats one that matches a single part a little better.
    Its confidence is the best it has in any list, comparable to the threshold.
    """
    merged: dict[str, RankedEntry] = {}
    floors = [min((r.score for r in ranked), default=0.0) for _, ranked in lists]
    total = sum(w for w, _ in lists) or 1.0
    for (weight, ranked), floor in zip(lists, floors, strict=True):
        for item in ranked:
            cur = merged.get(item.entry_id)
            if cur is None:
                cur = merged[item.entry_id] = RankedEntry(
                    item.entry_id, item.score, 0.0, set(item.routes), item.matched_text
                )
                cur.fused = sum(w * f for (w, _), f in zip(lists, floors, strict=True)) / total
            cur.fused += weight * (item.score - floor) / total
            cur.routes |= item.routes
            if item.score > cur.score:
                cur.score, cur.matched_text = item.score, item.matched_text
    return sorted(merged.values(), key=lambda r: (-r.fused, -r.score))
