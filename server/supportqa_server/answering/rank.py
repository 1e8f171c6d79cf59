"""Ranking: rows to entries, routes fused into one list, a confidence for the NoAnswer decision."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from supportqa_server.knowledge.entries import RowHit, split_sentences

DENSE, LEXICAL, READ, SEE = "dense", "lexical", "read", "see"
PASSAGE = "passage"  # the row kind of an article's (or a long answer's) passages
EXCERPT = "excerpt"  # the row kind of a long answer's excerpts


@dataclass(frozen=True)
class RankOptions:
    """How rows become a ranked entry list."""

    # Each field's default and meaning is the setting of the same name (runtime.settings,
    # the one source of defaults); `from_settings` builds the server's options.
    # How an entry's dense rows score it: "max" (best row), "mean_top" (mean of its best
    # `top_rows` rows), "knn" (similarity-weighted vote of the best `knn` rows overall).
    aggregation: str
    top_rows: int  # rows averaged by "mean_top" (aggregation and confidence)
    knn: int  # neighbours voting in "knn"
    knn_temperature: float  # softmax temperature of the kNN vote, cosine units
    # How the BM25 route joins: "rrf" (weighted reciprocal-rank fusion of the two orders) or
    # "score" (dense key + lexical_weight * the entry's BM25 over the question's best BM25).
    fusion: str
    lexical_weight: float  # weight of the BM25 route in the fused rank; 0: dense only
    # The confidence compared with the threshold: "best" (cosine of the entry's best row) or
    # "mean_top" (mean cosine of its best `top_rows` rows).
    confidence: str
    margin_weight: float  # confidence bonus per unit of top1-top2 cosine gap
    # Weight of the entry head's probability (head.py) in the ranking key: added as is with
    # "score" fusion, as a third reciprocal-rank route with "rrf". Orders, never confidence.
    head_weight: float
    # Weight of the entry head's probability in the confidence: (cosine + w * p) / (1 + w).
    # Where a head is trained, it tells an unknown question from a known one better than
    # the cosine alone (CLINC150 val, NoAnswer recall 0.85: in-scope 0.934 -> 0.952).
    head_confidence: float
    rrf_k: float = 60.0  # reciprocal-rank-fusion constant (Cormack et al. 2009); not a setting

    @classmethod
    def from_settings(cls, settings, **overrides) -> RankOptions:
        """The ranking options of a Settings, with ``overrides``.

        Raises:
            ValueError: A ranking setting is unusable.
        """
        names = [f.name for f in dataclasses.fields(cls) if f.name != "rrf_k"]
        opts = cls(**({n: getattr(settings, n) for n in names} | overrides))
        opts.check()
        return opts

    def check(self) -> None:
        """Raises ValueError naming the first unusable option."""
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {self.aggregation!r} is not one of "
                             f"{', '.join(AGGREGATIONS)}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion {self.fusion!r} is not one of {', '.join(FUSIONS)}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence {self.confidence!r} is not one of "
                             f"{', '.join(CONFIDENCES)}")
        if self.top_rows < 1 or self.knn < 1:
            raise ValueError("top_rows and knn must be at least 1")
        if self.knn_temperature <= 0 or self.rrf_k < 0:
            raise ValueError("knn_temperature must be positive and rrf_k not negative")
        if min(self.lexical_weight, self.margin_weight, self.head_weight,
               self.head_confidence) < 0:
            raise ValueError("lexical_weight, margin_weight, head_weight and head_confidence "
                             "must not be negative")


AGGREGATIONS = ("max", "mean_top", "knn")
FUSIONS = ("rrf", "score")
CONFIDENCES = ("best", "mean_top")


@dataclass
class RankedEntry:
    entry_id: str
    score: float  # confidence in [0, 1]
    fused: float  # ranking key
    routes: set[str] = field(default_factory=set)
    matched_text: str = ""


def _by_entry(hits: Sequence[RowHit]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each entry's dense cosines, best first (hits come best first from the store), and
    apart from them its best passage cosine.

    Passages count by their best alone, never averaged with the others: they say different
    things, and a mean would rank a long article below a short one for the same passage (a
    title, paraphrases and an answer say the same thing, and their mean is steadier than
    their best). Of an answer's excerpts only the best joins the cosines: one excerpt stands
    for the part of the answer asked about; several would outvote the title and paraphrases
    (knowledge/entries.py, EXCERPT_SENTENCES)."""
    by_entry: dict[str, list[float]] = defaultdict(list)
    passages: dict[str, float] = {}
    excerpted: set[str] = set()
    for h in hits:
        if h.kind == PASSAGE:
            if h.score > passages.get(h.entry_id, -math.inf):
                passages[h.entry_id] = h.score
            continue
        if h.kind == EXCERPT:
            if h.entry_id in excerpted:
                continue
            excerpted.add(h.entry_id)
        by_entry[h.entry_id].append(h.score)
    for s in by_entry.values():
        s.sort(reverse=True)
    return by_entry, passages


def _best(e: str, by_entry: dict[str, list[float]], passages: dict[str, float]) -> float:
    """An entry's best dense cosine, of any row."""
    return max(by_entry[e][0] if e in by_entry else -math.inf, passages.get(e, -math.inf))


def _aggregate(e: str, by_entry: dict[str, list[float]], passages: dict[str, float],
               n: int) -> float:
    """An entry's mean_top score: the mean of its best n rows, or its best passage if that
    is higher."""
    rows = by_entry.get(e)
    mean = _mean_top(rows, n) if rows else -math.inf
    return max(mean, passages.get(e, -math.inf))


def _mean_top(scores: list[float], n: int) -> float:
    top = scores[:n]
    return sum(top) / len(top)


def _dense_keys(
    hits: Sequence[RowHit], by_entry: dict[str, list[float]], passages: dict[str, float],
    opts: RankOptions
) -> dict[str, float]:
    """Ranking key of every entry with a dense row; higher is better."""
    entries = set(by_entry) | set(passages)
    if opts.aggregation == "max":
        return {e: _best(e, by_entry, passages) for e in entries}
    if opts.aggregation == "mean_top":
        return {e: _aggregate(e, by_entry, passages, opts.top_rows) for e in entries}
    top = sorted(hits, key=lambda h: -h.score)[: opts.knn]
    if not top:
        return {}
    m = top[0].score
    votes: dict[str, float] = defaultdict(float)
    for h in top:
        votes[h.entry_id] += math.exp((h.score - m) / opts.knn_temperature)
    total = sum(votes.values())
    # Voted entries rank by vote share, in (1, 2]; the others by their best cosine, in
    # [-2, 0], below every voted entry.
    return {e: 1.0 + votes[e] / total if e in votes
            else _best(e, by_entry, passages) - 1.0 for e in entries}


def rank(
    dense: Sequence[RowHit],
    lexical: Sequence[RowHit],
    opts: RankOptions,
    *,
    extra_routes: Sequence[str] = (),
    head: Mapping[str, float] | None = None,
) -> list[RankedEntry]:
    """Fuses the dense and lexical row hits of one question into entries, best first.

    The dense rows of an entry are aggregated into its dense key (``opts.aggregation``); the
    BM25 route, when ``opts.lexical_weight`` > 0, joins by RRF or by score. The confidence of
    an entry is a cosine of its dense rows (``opts.confidence``), clipped to [0, 1]; entries
    found by BM25 alone get 0. With ``opts.margin_weight``, the first entry's confidence gains
    that much per unit of its lead over the second entry's confidence.

    Args:
        dense: Dense row hits, best first; ``score`` is a cosine.
        lexical: BM25 row hits, best first; ``score`` is a BM25 score.
        opts: Ranking options.
        extra_routes: Routes to add to every entry (e.g. READ when the text came from OCR).
        head: The entry head's probabilities for this question (EntryHead.probabilities),
            weighted by ``opts.head_weight`` into the key of the entries found by the routes
            and by ``opts.head_confidence`` into their confidence.

    Returns:
        Every entry with a row, best first.
    """
    best_row: dict[str, RowHit] = {}
    for h in dense:
        if h.entry_id not in best_row or h.score > best_row[h.entry_id].score:
            best_row[h.entry_id] = h
    by_entry, passages = _by_entry(dense)
    dense_key = _dense_keys(dense, by_entry, passages, opts)
    lex_best: dict[str, float] = {}
    lex_row: dict[str, str] = {}  # the best BM25 row's text: what matched when no dense row did
    for h in lexical:
        if h.score > lex_best.get(h.entry_id, -math.inf):
            lex_best[h.entry_id] = h.score
            lex_row[h.entry_id] = h.text
    lex_order = sorted(lex_best, key=lambda e: -lex_best[e])
    fused: dict[str, float] = defaultdict(float)
    use_lex = opts.lexical_weight > 0 and bool(lex_order)
    if opts.fusion == "rrf":
        for r, e in enumerate(sorted(dense_key, key=lambda e: -dense_key[e])):
            fused[e] += 1.0 / (opts.rrf_k + r + 1)
        if use_lex:
            for r, e in enumerate(lex_order):
                fused[e] += opts.lexical_weight / (opts.rrf_k + r + 1)
    else:
        floor = min(dense_key.values(), default=0.0) - 1.0  # BM25-only entries sit below
        for e in set(dense_key) | (set(lex_best) if use_lex else set()):
            fused[e] = dense_key.get(e, floor)
        if use_lex:
            top_bm25 = lex_best[lex_order[0]] or 1.0
            for e, b in lex_best.items():
                fused[e] += opts.lexical_weight * b / top_bm25  # BM25 share of the best, [0, 1]
    if head and opts.head_weight > 0:
        if opts.fusion == "rrf":
            found = sorted((e for e in fused if e in head), key=lambda e: -head[e])
            for r, e in enumerate(found):
                fused[e] += opts.head_weight / (opts.rrf_k + r + 1)
        else:
            for e in fused:
                fused[e] += opts.head_weight * head.get(e, 0.0)
    lex_set = set(lex_order[:50])
    out = []
    for e, f in fused.items():
        row = best_row.get(e)
        if row is None:
            conf = 0.0
        elif opts.confidence == "mean_top":
            conf = _aggregate(e, by_entry, passages, opts.top_rows)
        else:
            conf = row.score
        if head is not None and opts.head_confidence > 0 and row is not None:
            w = opts.head_confidence
            conf = (conf + w * head.get(e, 0.0)) / (1.0 + w)
        routes = {DENSE} if row else set()
        if e in lex_set:
            routes.add(LEXICAL)
        routes.update(extra_routes)
        out.append(RankedEntry(e, max(0.0, min(1.0, conf)), f, routes,
                               row.text if row else lex_row.get(e, "")))
    out.sort(key=lambda r: (-r.fused, -r.score))
    if opts.margin_weight and len(out) >= 2:
        gap = max(0.0, out[0].score - max(r.score for r in out[1:]))
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


_WORD = re.compile(r"\w+")
# Words that say nothing about which sentence answers: left out of the overlap.
_FILLER = frozenset(
    "a an and are as at be by can do does for from how i if in is it my of on or so that the "
    "this to was what when where which who why will with you your".split())


def best_sentence(question: str, text: str, max_chars: int = 300) -> str:
    """The sentence of ``text`` that shares the most words with the question (weighted by
    their rarity in the text, ties to the earlier one), at most ``max_chars`` long: a short
    answer a bot can say before offering the whole passage. Empty when none shares a word."""
    asked = {w for w in _WORD.findall(question.lower()) if w not in _FILLER}
    sentences = [s.strip() for line in text.split("\n") for s in split_sentences(line)
                 if s.strip()]
    if not asked or not sentences:
        return ""
    seen = [set(_WORD.findall(s.lower())) for s in sentences]
    df = {w: sum(w in words for words in seen) for w in asked}
    scores = [sum(1.0 / df[w] for w in asked & words) for words in seen]
    best = max(range(len(sentences)), key=lambda i: (scores[i], -i))
    if scores[best] == 0:
        return ""
    s = sentences[best]
    return s if len(s) <= max_chars else s[: max_chars - 3].rsplit(" ", 1)[0] + "..."
