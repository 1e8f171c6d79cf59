"""One batch of questions on the model thread: embedded, searched on both routes, scored by
their knowledge bases' entry heads."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from supportqa_server.answering.head import EntryHead
from supportqa_server.knowledge.entries import RowHit
from supportqa_server.knowledge.store import KnowledgeStore

# Dense rows fetched per question: at least MIN_ROWS, and ROWS_PER_ANSWER per requested answer
# (an entry owns several rows), so aggregation sees the leaders' best paraphrases.
ROWS_PER_ANSWER = 40
MIN_ROWS = 200
# Half that when the entry head ranks too: offline it scores as 200 rows do (BANKING77 dev 0.9349
# both, ~106 rows an entry; CLINC150 in-scope 0.947 at NA recall 0.77 both), for 0.18 ms less
# search and half the ranking a question, 1.16x the QPS at c=32 (docs/benchmarks/tuning.md).
# Without the head (voice), 100 rows cost CLINC150 0.004 accuracy@1.
ROWS_PER_ANSWER_HEAD = 20
MIN_ROWS_HEAD = 100
# BM25 rows per question: fusion only needs the leaders' best BM25 row. Same dev scores as 200
# (BANKING77 0.919, CLINC150 0.915 @ NA recall 0.70) at a quarter of the rows to read and
# check against the committed versions (docs/benchmarks/README.md).
LEXICAL_ROWS = 50


def row_limits(top_k: int, head: bool, lexical: bool) -> tuple[int, int]:
    """(dense rows, BM25 rows) to fetch for a question asking for top_k answers."""
    limit = (max(MIN_ROWS_HEAD, top_k * ROWS_PER_ANSWER_HEAD) if head
             else max(MIN_ROWS, top_k * ROWS_PER_ANSWER))
    return limit, min(limit, LEXICAL_ROWS) if lexical else 0


@dataclass(frozen=True)
class SearchItem:
    """One question for the text encoder batch: embedded, then searched on both routes."""

    knowledge_base: str
    text: str
    limit: int  # dense rows
    lexical_limit: int  # BM25 rows; 0: no BM25
    locale: str
    tags: tuple[str, ...]
    head: EntryHead | None = None  # scored in the batch's job when the vector fits it


@dataclass(frozen=True)
class Found:
    vector: np.ndarray
    dense: list[RowHit]
    lexical: list[RowHit]
    search_us: int  # of the batch's job, for StageTimings
    head: dict[str, float] | None = None  # the entry head's probabilities, when asked
    head_us: int = 0  # the batch's head scoring: ranking work, for StageTimings.rank_us


def us_since(t0: float) -> int:
    """Microseconds since the perf_counter() reading t0."""
    return int((time.perf_counter() - t0) * 1e6)


def question_batch(
    store: KnowledgeStore, encode: Callable[[list[str]], list[np.ndarray]],
    items: list[SearchItem],
) -> list:
    """Embeds a batch, searches it, and scores it with the items' entry heads: per item a
    Found, or the exception of its search group (knowledge base, limits, filters: one Milvus
    call per route each)."""
    vectors = encode([it.text for it in items])
    t0 = time.perf_counter()
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        key = (it.knowledge_base, it.limit, it.lexical_limit, it.locale, it.tags)
        groups.setdefault(key, []).append(i)
    out: list = [None] * len(items)
    for (kb, limit, lexical_limit, locale, tags), idx in groups.items():
        try:
            found = store.search(
                kb, np.stack([vectors[i] for i in idx]), [items[i].text for i in idx],
                limit=limit, locale=locale, tags=tags, lexical=lexical_limit > 0,
                lexical_limit=lexical_limit or None,
            )
        except Exception as e:  # noqa: BLE001 - one group's failure is its callers' alone
            found = [e] * len(idx)
        for i, r in zip(idx, found, strict=True):
            out[i] = r
    search_us = us_since(t0)
    t0 = time.perf_counter()
    probs = head_batch(items, vectors)
    head_us = us_since(t0)
    return [r if isinstance(r, Exception) else Found(v, r[0], r[1], search_us, h, head_us)
            for v, r, h in zip(vectors, out, probs, strict=True)]


def head_batch(items: list[SearchItem], vectors: list[np.ndarray]) -> list:
    """Per item, its entry head's probabilities (None without a head that fits): one product
    per head for the batch.

    Run in the encoder batch's job on the model thread, not per question on the event loop:
    there its Python (the question's words) cost 6-12% of QPS at concurrency 32, likely by
    holding the GIL the model thread needs between the encoder's ops
    (docs/benchmarks/tuning.md). The product is numpy's: on one thread, as the CLI sets
    OpenBLAS (cli.NUMPY_BLAS_THREADS).
    """
    probs: list[dict[str, float] | None] = [None] * len(items)
    by_head: dict[int, list[int]] = {}  # id(): EntryHead holds arrays, so is not hashable
    for i, it in enumerate(items):
        if it.head is not None and it.head.dim == len(vectors[i]):
            by_head.setdefault(id(it.head), []).append(i)
    for idx in by_head.values():
        found = items[idx[0]].head.probabilities(
            np.stack([vectors[i] for i in idx]), [items[i].text for i in idx])
        for i, p in zip(idx, found, strict=True):
            probs[i] = p
    return probs
