"""Each knowledge base's own NoAnswer threshold, derived from its content.

One global threshold does not transfer: 0.44 (chosen on CLINC150 val) rejected 77% of val's
out-of-scope questions but 62% of test's, and a small knowledge base whose out-of-scope
questions come from its own domain needs a higher one than a large, varied one. So after
every write, once the entry head is trained, the server measures its knowledge base:

- **Answerable questions**: a fifth of each entry's paraphrases (entries with at least
  MIN_PARAPHRASES), held out of a copy of the knowledge base, asked against the rest with
  the same ranking and a head trained without them. Their confidence when the right entry
  comes first is what a real answerable question looks like.
- **Unanswerable questions**: a bundled pool of general out-of-scope questions
  (data/out_of_scope.txt), asked against the same copy.

The threshold maximises Youden's J over those two samples: the share of held-out paraphrases
answered right plus the share of the pool refused (the lowest of the thresholds within one
pool question of the best). Held-out paraphrases are a little easier
than customers' questions and the pool a little easier to refuse than a customer's
out-of-scope question; the J point between them measured best of the rules tried
(docs/decisions.md: pool quantiles, held-out quantiles, whole held-out entries as
out-of-scope). It is set twice: for the confidence with the entry head's probability
(rank.RankOptions.head_confidence) and for the cosine alone (while a head trains).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from supportqa_server.answering.head import HeadTrainer
from supportqa_server.answering.rank import RankOptions, rank
from supportqa_server.knowledge.entries import RowHit

QUESTION = "question"  # the row kind of a paraphrase
MIN_PARAPHRASES = 3  # entries with fewer keep all theirs: holding one out would starve them
HOLD_OUT = 0.2  # share of each entry's paraphrases held out
MAX_HELD_OUT = 2000  # held-out paraphrases at most (of the largest knowledge bases)
MIN_HELD_OUT = 20  # fewer: no calibration, the fallback threshold applies
CALIBRATION_ROWS = 100  # dense rows per question, as the server fetches with a head
GRID = np.round(np.arange(0.10, 0.95, 0.0025), 4)  # thresholds tried, confidence units


def out_of_scope_pool() -> list[str]:
    """The bundled general out-of-scope questions (one per line, '#' comments)."""
    text = resources.files("supportqa_server.answering").joinpath(
        "data/out_of_scope.txt").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


@dataclass(frozen=True)
class Calibration:
    """A knowledge base's calibrated thresholds and the evidence behind them."""

    revision: int  # the store revision measured
    threshold: float  # for the confidence with the head's probability
    threshold_cosine: float  # for the cosine confidence alone (no head)
    held_out: int  # paraphrases asked
    pool: int  # out-of-scope questions asked
    answered: float  # share of held-out paraphrases answered right at `threshold`
    refused: float  # share of the pool refused at `threshold`

    def describe(self) -> str:
        return (f"calibrated: {self.held_out} held-out paraphrases, {self.answered:.0%} "
                f"answered right; {self.pool} out-of-scope questions, {self.refused:.0%} "
                f"refused")


def hold_out(labels: Sequence[str], kinds: Sequence[str], seed: int) -> list[int]:
    """Row indices of the paraphrases to hold out: HOLD_OUT of each entry's (at least one),
    for entries with MIN_PARAPHRASES or more, at most MAX_HELD_OUT in all."""
    rng = random.Random(seed)
    by_entry: dict[str, list[int]] = {}
    for i, (label, kind) in enumerate(zip(labels, kinds, strict=True)):
        if kind == QUESTION:
            by_entry.setdefault(label, []).append(i)
    held = [i for rows in by_entry.values() if len(rows) >= MIN_PARAPHRASES
            for i in rng.sample(rows, max(1, int(len(rows) * HOLD_OUT)))]
    return sorted(rng.sample(held, min(MAX_HELD_OUT, len(held))))


def youden(right: np.ndarray, answerable: np.ndarray, refusable: np.ndarray
           ) -> tuple[float, float, float]:
    """(threshold, share answered right, share refused) at the lowest GRID threshold whose
    answered-right + refused is within one refusable question of the best.

    The pool is small (100), so its refused share moves in steps of 0.01 and is flat near
    the top; of the thresholds it cannot tell apart, the lowest refuses fewest answerable
    questions (CLINC150 val in-scope 0.937 -> 0.939 at NoAnswer recall 0.94 -> 0.92).

    right: per answerable question, whether its first entry was the right one;
    answerable, refusable: the first entry's confidence per question."""
    ok = answerable[right]
    answered = (ok[None, :] >= GRID[:, None]).sum(axis=1) / max(1, len(answerable))
    refused = (refusable[None, :] < GRID[:, None]).mean(axis=1)
    j = answered + refused
    best = int(np.argmax(j >= j.max() - 1.0 / max(1, len(refusable)) - 1e-9))
    return float(GRID[best]), float(answered[best]), float(refused[best])


class Calibrator:
    """Measures one knowledge base (the steps run on the model thread, like the head's).

    Args:
        revision, labels, vectors, texts, kinds: the knowledge base's text rows
            (KnowledgeStore.text_vectors).
        pool: the out-of-scope questions and their vectors, (n, dim) float32.
        opts: the server's ranking options for typed questions.
        head_kwargs: HeadTrainer's keyword arguments (c, words).
    """

    def __init__(self, revision: int, labels: Sequence[str], vectors: np.ndarray,
                 texts: Sequence[str], kinds: Sequence[str], pool: tuple[list[str], np.ndarray],
                 opts: RankOptions, head_kwargs: dict, words_for: Callable | None = None
                 ) -> None:
        self.revision, self.opts = revision, opts
        self.held = hold_out(labels, kinds, seed=revision)
        held = set(self.held)
        keep = [i for i in range(len(labels)) if i not in held]
        self.rows = [(labels[i], kinds[i], texts[i]) for i in keep]
        self.vectors = vectors[keep]
        self.questions = ([texts[i] for i in self.held] + pool[0],
                          np.concatenate([vectors[self.held], pool[1]]))
        self.truth = [labels[i] for i in self.held]
        self.pool_size = len(pool[0])
        self.trainer = None
        if self.usable:
            words = words_for([r[2] for r in self.rows], len({r[0] for r in self.rows})) \
                if words_for else None
            self.trainer = HeadTrainer(self.vectors, [r[0] for r in self.rows],
                                       **head_kwargs, revision=revision, words=words)

    @property
    def usable(self) -> bool:
        """Whether there are enough paraphrases (and entries) to calibrate."""
        return len(self.held) >= MIN_HELD_OUT and len({r[0] for r in self.rows}) >= 2

    def step(self) -> bool:
        """One step of the held-out head's fit; True when it is done."""
        return self.trainer is None or self.trainer.step()

    def result(self) -> Calibration | None:
        """The thresholds, once the fit is done; None when not usable."""
        if self.trainer is None:
            return None
        head = self.trainer.head()
        texts, vecs = self.questions
        sims = vecs @ self.vectors.T  # (questions, rows) cosines of unit vectors
        k = min(CALIBRATION_ROWS, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        probs = head.probabilities(vecs, texts)
        cosine_only = dataclasses.replace(self.opts, head_confidence=0.0)
        firsts, scores, cosines = [], [], []
        for q in range(len(texts)):
            idx = top[q][np.argsort(-sims[q, top[q]])]
            dense = [RowHit(*self.rows[i], float(sims[q, i])) for i in idx]
            ranked = rank(dense, [], self.opts, head=probs[q])
            firsts.append(ranked[0].entry_id)
            scores.append(ranked[0].score)
            cosines.append(rank(dense, [], cosine_only, head=probs[q])[0].score)
        n = len(self.held)
        right = np.array([f == t for f, t in zip(firsts[:n], self.truth, strict=True)])
        scores_a, cosines_a = np.array(scores), np.array(cosines)
        threshold, answered, refused = youden(right, scores_a[:n], scores_a[n:])
        threshold_cosine, _, _ = youden(right, cosines_a[:n], cosines_a[n:])
        return Calibration(self.revision, threshold, threshold_cosine, n, self.pool_size,
                           answered, refused)
