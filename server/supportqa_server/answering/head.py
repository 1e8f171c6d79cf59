"""Entry head: a linear classifier over a knowledge base's own text rows.

Retrieval ranks an entry by its nearest paraphrases. A multinomial logistic regression
trained on every row's vector (the row's entry as its class) learns instead which directions
separate the entries, from all of their paraphrases at once. Its probability, added to the
ranking key (rank.RankOptions.head_weight), moves close calls: accuracy@1 +0.007 on average
over four BANKING77 dev splits, +0.022 on held-out CLINC150 questions
(docs/benchmarks/quality.md). It is SetFit's classifier head, trained on the knowledge base
as it is, so it needs no labels beyond the entries themselves.

Besides the vector, the head reads the question's words: TF-IDF over the knowledge base's word
unigrams and bigrams (WordFeatures), the classic intent-classifier features, side by side with
the vector. The encoder compresses a sentence into 384 numbers; the words keep what it blurs
("top up" against "top-up failed", a card's brand). Through the API, on four BANKING77 dev
splits, this lifted accuracy@1 by 0.002-0.009 over the vector-only head; CLINC150 in-scope
accuracy went from 0.946 to 0.948 at the same NoAnswer recall (docs/benchmarks/quality.md).

Training is full-batch L-BFGS in torch on the vectors already stored and the rows' words:
about 6 s for 8,000 rows of 384 floats, ~9,000 terms and 77 entries on 2 cores (4 s without
words). The pipeline retrains it after writes (knowledge_bases.py) and only uses a head
trained on the knowledge base's current revision.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w\w+")  # words of two or more characters, lower-cased first
MIN_DF = 2  # a term must occur in this many rows: one-off words and typos carry no signal
# At most entries x words weights for the word features: 10M floats (40 MB). A knowledge base
# with many entries keeps its most frequent words only.
MAX_WORD_WEIGHTS = 10_000_000


class WordFeatures:
    """TF-IDF over word unigrams and bigrams, fitted on a knowledge base's row texts.

    Terms that occur in at least MIN_DF rows (the most frequent ``max_terms`` of them);
    term frequency 1 + ln(count); idf ln((1 + rows) / (1 + df)) + 1; each text's vector
    l2-normalised, as the row vectors are, so neither part outweighs the other by scale.
    """

    def __init__(self, texts: Sequence[str], max_terms: int) -> None:
        df: Counter[str] = Counter()
        for text in texts:
            df.update(set(self.terms(text)))
        kept = [t for t, n in df.most_common(max_terms) if n >= MIN_DF]
        self.index = {t: i for i, t in enumerate(kept)}
        n = len(texts)
        # Python floats: a question's ~20 terms cost less in Python than in numpy calls
        self._idf = [math.log((1 + n) / (1 + df[t])) + 1 for t in kept]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def idf(self) -> np.ndarray:
        """Each term's idf, (terms,) float32."""
        return np.array(self._idf, np.float32)

    @staticmethod
    def terms(text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]

    def transform(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row of each value, term of each value, values): a texts x terms sparse matrix."""
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        index, idf = self.index, self._idf
        for r, text in enumerate(texts):
            counts = Counter(i for t in self.terms(text) if (i := index.get(t)) is not None)
            v = [(1 + math.log(c)) * idf[i] for i, c in counts.items()]
            norm = math.sqrt(sum(x * x for x in v))
            rows += [r] * len(v)
            cols += counts.keys()
            vals += [x / norm for x in v]
        return (np.array(rows, np.int64), np.array(cols, np.int64),
                np.array(vals, np.float32))


@dataclass(frozen=True)
class EntryHead:
    """A trained head: one weight row and bias per entry."""

    entry_ids: tuple[str, ...]
    weight: np.ndarray  # (entries, dim) float32
    bias: np.ndarray  # (entries,) float32
    revision: int  # the knowledge base's revision it was trained on (store.revision)
    words: WordFeatures | None = None
    word_weight: np.ndarray | None = None  # (entries, len(words)) float32

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def probabilities(self, vectors: np.ndarray, texts: Sequence[str] | None = None,
                      top: int = 50) -> list[dict[str, float]]:
        """Per question vector (and its text, for a head with word features), its ``top``
        most probable entries and their probabilities.

        The rest of the distribution (below the top ``top``) is dropped: the ranking only
        adds probabilities to entries that retrieval found, and those are the likely ones.
        """
        logits = vectors.astype(np.float32) @ self.weight.T + self.bias
        if self.words is not None and self.word_weight is not None:
            if texts is None or len(texts) != len(vectors):
                raise ValueError("a head with word features needs each question's text")
            rows, cols, vals = self.words.transform(texts)
            if len(texts) == 1:  # a lone question: one product, no scatter
                logits[0] += self.word_weight[:, cols] @ vals
            elif len(rows):
                # transform lists each text's terms together, texts in order: one sum per
                # text's run of columns (np.add.at took 167 of 693 us for 16 questions)
                present, starts = np.unique(rows, return_index=True)
                logits[present] += np.add.reduceat(
                    self.word_weight[:, cols] * vals, starts, axis=1).T
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        k = min(top, p.shape[1])
        idx = np.argpartition(-p, k - 1, axis=1)[:, :k]
        ids = self.entry_ids
        return [dict(zip([ids[j] for j in row], ps, strict=True))
                for row, ps in zip(idx.tolist(), np.take_along_axis(p, idx, 1).tolist(),
                                   strict=True)]


WordRows = tuple[WordFeatures, np.ndarray, np.ndarray, np.ndarray]


def word_rows(texts: Sequence[str], entries: int) -> WordRows | None:
    """The word features of a head over ``entries`` entries fitted on the row texts, and the
    rows' TF-IDF as (row, term, value) triples; None when no term occurs twice."""
    words = WordFeatures(texts, max_terms=max(1, MAX_WORD_WEIGHTS // max(1, entries)))
    if not len(words):
        return None
    return (words, *words.transform(texts))


class _SparseRows:
    """A sparse (rows, terms) matrix X for X @ W.T with W's gradient: CSR copies of X and of
    its transpose, made once, so backward needs no transpose per call (torch's COO product:
    19 ms forward and backward at 8,155 x 8,913 and 77 entries; this: 5 ms)."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray,
                 shape: tuple[int, int]) -> None:
        import torch

        coo = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals), shape,
            check_invariants=True,
        ).coalesce()
        with warnings.catch_warnings():  # "CSR support is in beta": products are all we use
            warnings.simplefilter("ignore", UserWarning)
            x, xt = coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr()

        class Product(torch.autograd.Function):
            @staticmethod
            def forward(ctx, w):
                return x @ w.T  # (rows, entries)

            @staticmethod
            def backward(ctx, grad):
                return (xt @ grad).T  # (entries, terms)

        self._product = Product

    def times(self, w):
        """X @ w.T for w (entries, terms)."""
        return self._product.apply(w)


class HeadTrainer:
    """Fits a head in steps of about STEP_SECONDS, so a caller can interleave other work on
    the same thread (the pipeline's model thread: its encoder batches run between steps
    instead of waiting seconds for the whole fit).

    The objective is softmax cross-entropy summed over rows + ||W||^2 / (2 c), that is
    scikit-learn's LogisticRegression(C=c), multinomial, bias not penalised: the offline
    sweep picked c with it (docs/benchmarks/quality.md).

    Args:
        vectors: (rows, dim) unit text vectors of the knowledge base's rows.
        labels: The entry of each row.
        texts: The rows' texts: with them the head also reads words (WordFeatures).
        words: word_rows(texts, entries) computed beforehand, instead of ``texts`` (it is
            plain Python and numpy, so a caller can run it off the model thread).
        c: Inverse regularisation strength; larger fits the rows more closely.
        max_iter: L-BFGS iterations in all (each one pass over the rows).
        revision: Stored with the head (EntryHead.revision).

    Raises:
        ValueError: No rows, a label count that does not match, fewer than two entries, or
            a non-positive c.
    """

    # Seconds of model-thread time one step() aims at: an encoder batch queued behind a step
    # waits about this long. One L-BFGS iteration is the floor: ~30 ms at 8,000 rows x 384 x
    # 77 entries, ~220 ms at 15,000 x 768 x 150 (2 cores).
    STEP_SECONDS = 0.05

    def __init__(self, vectors: np.ndarray, labels: Sequence[str], *,
                 texts: Sequence[str] | None = None, words: WordRows | None = None,
                 c: float = 10.0, max_iter: int = 200, revision: int = 0) -> None:
        import torch

        if len(vectors) == 0 or len(vectors) != len(labels):
            raise ValueError(f"{len(vectors)} vectors for {len(labels)} labels")
        if texts is not None and len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts for {len(labels)} labels")
        if words is not None and len(words[1]) and int(words[1].max()) >= len(labels):
            raise ValueError("word rows beyond the rows given")
        if c <= 0:
            raise ValueError(f"head C {c} must be positive")
        self.entry_ids = tuple(sorted(set(labels)))
        if len(self.entry_ids) < 2:
            raise ValueError("a head needs at least two entries")
        col = {e: i for i, e in enumerate(self.entry_ids)}
        self._x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        self._y = torch.tensor([col[label] for label in labels], dtype=torch.long)
        self._c, self._max_iter, self.revision = c, max_iter, revision
        n = len(self.entry_ids)
        self._w = torch.zeros(n, self._x.shape[1], requires_grad=True)
        self._b = torch.zeros(n, requires_grad=True)
        params = [self._w, self._b]
        self.words, self._xw, self._ww = None, None, None
        if words is None and texts is not None:
            words = word_rows(texts, n)
        if words is not None:
            self.words, rows, cols, vals = words
            self._xw = _SparseRows(rows, cols, vals, (len(labels), len(self.words)))
            self._ww = torch.zeros(n, len(self.words), requires_grad=True)
            params.append(self._ww)
        self._opt = torch.optim.LBFGS(
            params, lr=1.0, max_iter=1, history_size=10,
            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe",
        )
        self.iterations = 0
        self.done = False
        self._last_loss = float("inf")
        self._per_iteration_s = 0.0  # measured by the first step

    def _loss(self):
        import torch

        self._opt.zero_grad()
        x, w = self._x, self._w
        logits, penalty = x @ w.T + self._b, (w * w).sum()
        if self._ww is not None:
            logits = logits + self._xw.times(self._ww)
            penalty = penalty + (self._ww * self._ww).sum()
        loss = torch.nn.functional.cross_entropy(logits, self._y, reduction="sum")
        # Divided by the row count so the loss is O(1) whatever the size (same minimum).
        loss = (loss + penalty / (2 * self._c)) / len(self._y)
        loss.backward()
        return loss

    def step(self) -> bool:
        """Runs as many iterations as fit in about STEP_SECONDS (at least one); True once the
        fit has converged or used max_iter. The optimiser's history carries over."""
        import torch

        if self.done:
            return True
        n = 1
        if self._per_iteration_s:
            n = max(1, min(self._max_iter - self.iterations,
                           int(self.STEP_SECONDS / self._per_iteration_s)))
        group = self._opt.param_groups[0]
        group["max_iter"], group["max_eval"] = n, 2 * n + 1  # a line search may evaluate twice
        t0 = time.perf_counter()
        with torch.enable_grad():
            self._opt.step(self._loss)
        state = self._opt.state[self._w]
        ran = int(state.get("n_iter", 0)) - self.iterations
        if ran:
            self._per_iteration_s = (time.perf_counter() - t0) / ran
        self.iterations += ran
        loss = float(state.get("prev_loss", self._last_loss))
        # A step ends early at its evaluation budget as well as at convergence, so converged
        # means the loss stopped moving, not a short step; or no iteration at all (the
        # gradient already within tolerance, as when no row tells the entries apart).
        self.done = (not ran or self._last_loss - loss < 1e-9
                     or self.iterations >= self._max_iter)
        self._last_loss = loss
        return self.done

    def head(self) -> EntryHead:
        return EntryHead(
            self.entry_ids, self._w.detach().numpy().copy(), self._b.detach().numpy().copy(),
            self.revision, self.words,
            None if self._ww is None else self._ww.detach().numpy().copy(),
        )


def train_head(vectors: np.ndarray, labels: Sequence[str], **kwargs) -> EntryHead:
    """Fits a head in one go (HeadTrainer's arguments)."""
    trainer = HeadTrainer(vectors, labels, **kwargs)
    while not trainer.step():
        pass
    return trainer.head()
