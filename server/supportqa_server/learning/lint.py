"""The knowledge base's lint: pairs of entries a question cannot tell apart, and paraphrases
that score higher for another entry than for their own."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from supportqa_server.errors import InvalidInput
from supportqa_server.learning.vectors import CHUNK, TOP_ROWS, EntryRows, entry_scores, unit

# Cosine of two entries' centroids (the mean of their title and paraphrase vectors) from which
# they are called confusable, and of two paraphrases of different entries from which they are
# near duplicates (MiniLM on BANKING77 and CLINC150: docs/benchmarks/learning.md).
CONFUSABLE = 0.8
NEAR_DUPLICATE = 0.9
QUESTION_KINDS = ("title", "question")  # the rows that say what an entry is asked as


@dataclass(frozen=True)
class LintOptions:
    """What lint reports."""

    confusable: float = CONFUSABLE
    near_duplicate: float = NEAR_DUPLICATE
    max_findings: int = 200  # of each kind, worst first
    top_rows: int = TOP_ROWS

    def check(self) -> None:
        if not (-1.0 <= self.confusable <= 1.0 and -1.0 <= self.near_duplicate <= 1.0):
            raise InvalidInput("confusable and near_duplicate are cosines: within [-1, 1]")
        if self.max_findings < 1:
            raise InvalidInput("max_findings must be at least 1")


@dataclass(frozen=True)
class ConfusablePair:
    """Two entries too close to tell apart.

    Attributes:
        entry_a, entry_b: The entries (entry_a sorts first).
        similarity: Cosine of their centroids.
        text_a, text_b: Their closest title or paraphrase pair.
        text_similarity: The cosine of that pair.
    """

    entry_a: str
    entry_b: str
    similarity: float
    text_a: str
    text_b: str
    text_similarity: float


@dataclass(frozen=True)
class MisplacedParaphrase:
    """A paraphrase that, asked as a question without its own row, ranks another entry first.

    Attributes:
        entry_id: Its entry.
        paraphrase: Its text.
        own_score: Its entry's score (mean of its best rows, its own row left out).
        other_entry: The entry that scores higher.
        other_score: That entry's score.
    """

    entry_id: str
    paraphrase: str
    own_score: float
    other_entry: str
    other_score: float


@dataclass(frozen=True)
class LintReport:
    entries: int
    rows: int
    confusable: tuple[ConfusablePair, ...]
    misplaced: tuple[MisplacedParaphrase, ...]


def centroids(rows: EntryRows) -> np.ndarray:
    """(E, d) each entry's unit centroid: of its title and paraphrase rows, or of all its rows
    when it has neither (an article)."""
    asked = np.isin(np.asarray(rows.kinds), QUESTION_KINDS)
    out = np.zeros((len(rows.entry_ids), rows.vectors.shape[1]), np.float32)
    for e in range(len(rows.entry_ids)):
        mine = rows.labels == e
        pick = mine & asked if (mine & asked).any() else mine
        out[e] = rows.vectors[pick].mean(axis=0)
    return unit(out)


def lint(rows: EntryRows, options: LintOptions = LintOptions()) -> LintReport:
    """Confusable entry pairs and misplaced paraphrases of one knowledge base.

    A pair is confusable when its centroids reach ``confusable`` or a title or paraphrase of
    one reaches ``near_duplicate`` with one of the other. A paraphrase is misplaced when,
    scored as the dense route scores a question (mean of an entry's best rows) with its own
    row left out, another entry beats its own: a customer wording it that way would likely
    get the other entry.
    """
    options.check()
    n_entries = len(rows.entry_ids)
    if n_entries < 2:
        return LintReport(n_entries, len(rows), (), ())
    cent = centroids(rows)
    sim = cent @ cent.T  # (E, E) centroid cosines
    asked = np.flatnonzero(np.isin(np.asarray(rows.kinds), QUESTION_KINDS))
    qv, ql = rows.vectors[asked], rows.labels[asked]
    closest: dict[tuple[int, int], tuple[float, int, int]] = {}  # (a, b) -> (cos, row, row)
    for start in range(0, len(asked), CHUNK):
        s = qv[start : start + CHUNK] @ qv.T  # (c, d) x (d, Q) -> (c, Q)
        s[ql[start : start + CHUNK, None] == ql[None, :]] = -np.inf  # other entries only
        best = np.argmax(s, axis=1)
        for i, j in enumerate(best):
            a, b, cos = int(ql[start + i]), int(ql[j]), float(s[i, j])
            key, pair = ((a, b), (asked[start + i], asked[j])) if a < b else (
                (b, a), (asked[j], asked[start + i]))
            if np.isfinite(cos) and cos > closest.get(key, (-2.0,))[0]:
                closest[key] = (cos, *pair)
    flagged = {(a, b) for a, b in zip(*np.nonzero(np.triu(sim, 1) >= options.confusable),
                                      strict=True)}
    flagged |= {k for k, v in closest.items() if v[0] >= options.near_duplicate}
    pairs = []
    for a, b in flagged:
        cos, ra, rb = closest.get((a, b), (0.0, -1, -1))
        if rows.entry_ids[a] > rows.entry_ids[b]:
            a, b, ra, rb = b, a, rb, ra
        pairs.append(ConfusablePair(
            rows.entry_ids[a], rows.entry_ids[b], round(float(sim[a, b]), 4),
            rows.texts[ra] if ra >= 0 else "", rows.texts[rb] if rb >= 0 else "",
            round(cos, 4)))
    pairs.sort(key=lambda p: (-max(p.similarity, p.text_similarity), p.entry_a, p.entry_b))
    paraphrases = np.flatnonzero(np.asarray(rows.kinds) == "question")
    scores = entry_scores(rows.vectors[paraphrases], rows, top_rows=options.top_rows,
                          skip=paraphrases)  # (P, E), each paraphrase without its own row
    misplaced = []
    for i, r in enumerate(paraphrases):
        own = int(rows.labels[r])
        mine = float(scores[i, own])
        scores[i, own] = -np.inf
        other = int(np.argmax(scores[i]))
        if scores[i, other] > mine:
            misplaced.append(MisplacedParaphrase(
                rows.entry_ids[own], rows.texts[r], round(mine, 4), rows.entry_ids[other],
                round(float(scores[i, other]), 4)))
    misplaced.sort(key=lambda m: m.own_score - m.other_score)
    return LintReport(n_entries, len(rows), tuple(pairs[: options.max_findings]),
                      tuple(misplaced[: options.max_findings]))
