"""Suggestions from the question log: the questions that got no answer or a not-helpful
Feedback, clustered by meaning; a cluster that sits near an entry (or whose Feedback named
the right entry) becomes new paraphrases for that entry, any other cluster a new entry."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from supportqa_server.errors import InvalidInput
from supportqa_server.knowledge.entries import EntryData
from supportqa_server.knowledge.questions import NO_ANSWER, NOT_HELPFUL, LoggedQuestion
from supportqa_server.learning.vectors import TOP_ROWS, EntryRows, entry_scores, unit

PARAPHRASES, NEW_ENTRY = "paraphrases", "new_entry"
# Average-linkage cosine distance at which clusters stop merging: questions of one intent
# join, neighbouring intents stay apart (MiniLM on CLINC150: docs/benchmarks/learning.md).
CLUSTER_DISTANCE = 0.5
# A cluster whose mean score for an entry (the dense route's: mean of its best 3 rows) reaches
# this is about that entry, worded in a way it lacks; below it, about something absent
# (docs/benchmarks/learning.md).
NEAR = 0.45


@dataclass(frozen=True)
class SuggestOptions:
    """How the question log becomes suggestions."""

    min_questions: int = 2  # logged questions a cluster needs to be proposed
    cluster_distance: float = CLUSTER_DISTANCE
    near: float = NEAR
    max_questions: int = 2000  # the newest unanswered questions read (clustering is O(n^2))
    max_examples: int = 20  # distinct questions per suggestion, most asked first
    max_suggestions: int = 50
    top_rows: int = TOP_ROWS

    def check(self) -> None:
        """Raises InvalidInput naming the first unusable option."""
        if self.min_questions < 1 or self.max_examples < 1 or self.max_suggestions < 1:
            raise InvalidInput("min_questions, max_examples and max_suggestions must be at "
                               "least 1 (0 in a request means the default)")
        if not 0.0 < self.cluster_distance < 2.0 or not -1.0 <= self.near <= 1.0:
            raise InvalidInput("cluster_distance must lie in (0, 2) and near in [-1, 1]")


@dataclass(frozen=True)
class Suggestion:
    """One proposal for the knowledge base.

    Attributes:
        id: Stable while the questions it stands for stay the same (`supportqa accept ID`).
        kind: PARAPHRASES (add questions to entry_id) or NEW_ENTRY.
        entry_id: The entry to extend; "" for a new entry.
        questions: Distinct question texts, most asked first: the paraphrases to add, or the
            examples of the new entry.
        request_ids: The logged questions it stands for.
        score: For paraphrases, the questions' mean score for the entry; for a new entry,
            how close its questions are to each other (mean cosine to their centroid).
        nearest_entry: For a new entry, the entry its questions score best for ("" if none).
        reason: Why, for a person.
        blocked: Why `supportqa accept` cannot apply it by Get + Upsert ("" when it can).
    """

    id: str
    kind: str
    entry_id: str
    questions: tuple[str, ...]
    request_ids: tuple[str, ...]
    score: float
    reason: str
    nearest_entry: str = ""
    blocked: str = ""

    @property
    def asked(self) -> int:
        """Logged questions it stands for."""
        return len(self.request_ids)


def normal(text: str) -> str:
    """A text as suggestions compare them: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def clusters(vectors: np.ndarray, distance: float) -> list[np.ndarray]:
    """Indices of each cluster of (n, d) unit vectors: average-linkage agglomerative
    clustering on cosine distance, merging while clusters lie within ``distance``."""
    if len(vectors) < 2:
        return [np.arange(len(vectors))] if len(vectors) else []
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(n_clusters=None, distance_threshold=distance,
                                     metric="cosine", linkage="average").fit_predict(vectors)
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def _blocked(e: EntryData) -> str:
    if e.body_format:
        return (f"entry {e.id!r} is an article and the server keeps no article bodies: add "
                "these questions to its source (its front matter or JSONL questions) and "
                "ingest it again")
    if e.image_count:
        return (f"entry {e.id!r} has images, which Get does not return: add these questions "
                "to its source and ingest it again")
    return ""


def _id(kind: str, entry_id: str, request_ids: Sequence[str]) -> str:
    return hashlib.sha256("\0".join([kind, entry_id, *sorted(request_ids)]).encode()
                          ).hexdigest()[:12]


def _texts(qs: Sequence[LoggedQuestion], limit: int) -> tuple[str, ...]:
    """Distinct texts of qs, most asked first (then newest), as first written."""
    counts = Counter(normal(q.text) for q in qs)
    first: dict[str, str] = {}
    for q in sorted(qs, key=lambda q: -q.at):
        first.setdefault(normal(q.text), q.text.strip())
    return tuple(first[t] for t in sorted(first, key=lambda t: -counts[t])[:limit])


def _why(qs: Sequence[LoggedQuestion]) -> str:
    no = sum(q.outcome == NO_ANSWER for q in qs)
    bad = sum(q.feedback == NOT_HELPFUL for q in qs)
    parts = [f"{no} got no answer"] if no else []
    parts += [f"{bad} had a not-helpful feedback"] if bad else []
    return f"{len(qs)} question(s): " + ", ".join(parts or ["flagged"])


def suggest(questions: Sequence[LoggedQuestion], entries: Mapping[str, EntryData],
            rows: EntryRows, options: SuggestOptions = SuggestOptions()) -> list[Suggestion]:
    """Proposals from logged questions, most asked first.

    A question counts when it got no answer, had a not-helpful Feedback, or a Feedback that
    named an entry other than the one answered; questions already among an entry's texts
    (a suggestion accepted earlier) do not. Questions whose Feedback named the right entry
    go to that entry as they are; the others are clustered (`clusters`), and a cluster of at
    least ``min_questions`` goes to the entry it scores best for when that score reaches
    ``near`` (an entry most of its questions were answered with and called not helpful is
    passed over), else it becomes a new entry.

    Args:
        questions: Logged questions of one knowledge base (knowledge/questions.py).
        entries: Its entries by id.
        rows: Its rows (vectors.rows_of, or EntryRows.of_entries).
        options: Thresholds and limits.
    """
    options.check()
    known = {normal(t) for t in rows.texts} | {
        normal(t) for e in entries.values() for t in (e.title, *e.questions)}
    named: dict[str, list[LoggedQuestion]] = {}
    rest: list[LoggedQuestion] = []
    for q in questions:
        if not q.text.strip() or normal(q.text) in known:
            continue
        if q.feedback_entry in entries and q.feedback_entry != q.answered_entry:
            named.setdefault(q.feedback_entry, []).append(q)
        elif q.outcome == NO_ANSWER or q.feedback == NOT_HELPFUL:
            rest.append(q)
    to_entry = {e: _Proposal(list(qs), why=[f"Feedback named it for {len(qs)}"])
                for e, qs in named.items()}
    out: list[Suggestion] = []
    vectors = unit(np.stack([q.vector for q in rest])) if rest else np.zeros((0, 1), np.float32)
    scores = entry_scores(vectors, rows, top_rows=options.top_rows)
    for members in clusters(vectors, options.cluster_distance):
        qs = [rest[i] for i in members]
        if len(qs) < options.min_questions:
            continue
        mean = scores[members].mean(axis=0)  # (E,) the cluster's score for each entry
        rejected = Counter(q.answered_entry for q in qs if q.feedback == NOT_HELPFUL)
        for entry_id, n in rejected.items():
            if entry_id in rows.entry_ids and 2 * n >= len(qs):
                mean[rows.entry_ids.index(entry_id)] = -np.inf
        best = int(np.argmax(mean)) if len(mean) else -1
        best_id = rows.entry_ids[best] if best >= 0 and np.isfinite(mean[best]) else ""
        if best_id in entries and mean[best] >= options.near:
            p = to_entry.setdefault(best_id, _Proposal([]))
            p.questions += qs
            p.score_sum += float(mean[best]) * len(qs)
            p.scored += len(qs)
            p.why.append(f"{_why(qs)}; they score {mean[best]:.2f} for it")
            continue
        centroid = unit(vectors[members].mean(axis=0, keepdims=True))[0]
        ids = tuple(q.request_id for q in qs)
        near = f"; the nearest entry, {best_id!r}, scores {mean[best]:.2f}" if best_id else ""
        out.append(Suggestion(
            _id(NEW_ENTRY, "", ids), NEW_ENTRY, "", _texts(qs, options.max_examples), ids,
            round(float(np.mean(vectors[members] @ centroid)), 4),
            f"{_why(qs)} about nothing in the knowledge base{near}", best_id))
    for entry_id, p in to_entry.items():
        ids = tuple(q.request_id for q in p.questions)
        out.append(Suggestion(
            _id(PARAPHRASES, entry_id, ids), PARAPHRASES, entry_id,
            _texts(p.questions, options.max_examples), ids,
            round(p.score_sum / p.scored, 4) if p.scored else 1.0, "; ".join(p.why),
            blocked=_blocked(entries[entry_id])))
    out.sort(key=lambda s: (-s.asked, s.kind, s.entry_id, s.id))
    return out[: options.max_suggestions]


@dataclass
class _Proposal:
    """Questions gathering for one entry's paraphrase suggestion."""

    questions: list[LoggedQuestion]
    score_sum: float = 0.0  # cluster score x questions, over the clusters joined
    scored: int = 0  # questions that came by a cluster (not named by Feedback)
    why: list[str] = field(default_factory=list)
