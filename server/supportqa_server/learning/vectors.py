"""A knowledge base's rows as arrays, and questions scored against its entries the way the
server's dense route ranks them (mean of an entry's best rows among the nearest)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from supportqa_server.errors import TooLarge
from supportqa_server.knowledge.entries import EntryData

# Rows the server fetches for a question and aggregates (answering/search.py: MIN_ROWS), and
# how many of an entry's best it averages (SUPPORTQA_TOP_ROWS).
FETCH_ROWS = 200
TOP_ROWS = 3
CHUNK = 256  # questions per similarity product: (256, R) float32, 100 MB at 100k rows


@dataclass(frozen=True)
class EntryRows:
    """A knowledge base's searchable rows (title, paraphrases, answer, excerpts, passages).

    Attributes:
        entry_ids: The entries, in index order.
        labels: (R,) index into entry_ids of each row's entry.
        vectors: (R, d) float32 unit vectors, one per row.
        texts: Each row's text.
        kinds: Each row's kind: title | question | answer | excerpt | passage.
    """

    entry_ids: tuple[str, ...]
    labels: np.ndarray
    vectors: np.ndarray
    texts: tuple[str, ...]
    kinds: tuple[str, ...]

    @classmethod
    def build(cls, row_entries: Sequence[str], vectors: np.ndarray, texts: Sequence[str],
              kinds: Sequence[str]) -> EntryRows:
        """Rows from parallel lists: each row's entry id, vector, text and kind."""
        ids = tuple(dict.fromkeys(row_entries))
        index = {e: i for i, e in enumerate(ids)}
        vectors = np.asarray(vectors, np.float32).reshape(len(texts), -1)
        return cls(ids, np.asarray([index[e] for e in row_entries], np.int64),
                   unit(vectors), tuple(texts), tuple(kinds))

    @classmethod
    def of_entries(cls, entries: Sequence[EntryData], vectors: Sequence[np.ndarray]
                   ) -> EntryRows:
        """Rows of entries whose texts() were embedded: vectors[i] is (len(texts()), d)."""
        ids, texts, kinds = [], [], []
        for e, v in zip(entries, vectors, strict=True):
            if len(v) != len(e.texts()):
                raise ValueError(f"entry {e.id!r}: {len(e.texts())} texts, {len(v)} vectors")
            for kind, text in e.texts():
                ids.append(e.id)
                texts.append(text)
                kinds.append(kind)
        stacked = np.concatenate([np.asarray(v, np.float32) for v in vectors]) if vectors else (
            np.zeros((0, 0), np.float32))
        return cls.build(ids, stacked, texts, kinds)

    def __len__(self) -> int:
        return len(self.texts)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(n > 0, n, 1.0)).astype(np.float32)


def rows_of(store, kb: str, max_rows: int) -> tuple[EntryRows, dict[str, EntryData]]:
    """A knowledge base's committed rows and entries, read from the store (a store thread's
    job: it scans the rows collection).

    Raises:
        NotFound: no such knowledge base.
        TooLarge: it has more than max_rows rows.
    """
    got = store.text_vectors(kb, max_rows)
    if got is None:
        raise TooLarge(f"knowledge base {kb!r} has {store.counts(kb)[1]} rows; this reads at "
                       f"most {max_rows}")
    _, row_entries, vectors, texts = got[:4]
    entries = {i: e for i in store.ids(kb) if (e := store.entry(kb, i)) is not None}
    kind_of = {i: {t: k for k, t in e.texts()} for i, e in entries.items()}
    keep = [j for j, i in enumerate(row_entries) if i in entries]  # entries deleted meanwhile
    return EntryRows.build(
        [row_entries[j] for j in keep], vectors[keep], [texts[j] for j in keep],
        [kind_of[row_entries[j]].get(texts[j], "passage") for j in keep]), entries


def entry_scores(questions: np.ndarray, rows: EntryRows, *, top_rows: int = TOP_ROWS,
                 fetch: int = FETCH_ROWS, skip: np.ndarray | None = None) -> np.ndarray:
    """(n, E) each question's score for each entry: the mean cosine of the entry's best
    ``top_rows`` rows among the question's ``fetch`` nearest rows, as the dense route ranks;
    -1 for entries with no row among them.

    Args:
        questions: (n, d) unit vectors.
        rows: The knowledge base's rows.
        skip: (n,) a row index per question left out of its search (its own row), or -1.
    """
    n, n_entries = len(questions), len(rows.entry_ids)
    out = np.full((n, n_entries), -1.0, np.float32)
    if n == 0 or len(rows) == 0:
        return out
    k = min(fetch, len(rows))
    for start in range(0, n, CHUNK):
        sims = questions[start : start + CHUNK] @ rows.vectors.T  # (c, d) x (d, R) -> (c, R)
        if skip is not None:
            own = skip[start : start + CHUNK]
            hit = own >= 0
            sims[np.flatnonzero(hit), own[hit]] = -np.inf
        near = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (c, k) nearest rows, unordered
        for i, idx in enumerate(near):
            score, label = sims[i, idx], rows.labels[idx]
            order = np.lexsort((-score, label))  # by entry, best row first
            score, label = score[order], label[order]
            first = np.r_[True, label[1:] != label[:-1]]
            segment = np.cumsum(first) - 1  # (k,) which entry run each row is in
            rank = np.arange(k) - np.flatnonzero(first)[segment]  # 0 = the entry's best row
            keep = (rank < top_rows) & np.isfinite(score)
            sums = np.bincount(segment[keep], score[keep], minlength=segment[-1] + 1)
            counts = np.bincount(segment[keep], minlength=segment[-1] + 1)
            valid = counts > 0
            out[start + i, label[first][valid]] = sums[valid] / counts[valid]
    return out
