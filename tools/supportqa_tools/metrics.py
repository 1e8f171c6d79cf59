"""Scores of an evaluation run: accuracy, no-answer quality and latency, and the threshold
sweep that picks where "no answer" starts."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from supportqa.bench import percentile


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the server answered to one query."""

    label: str  # gold label; the correct entry's id, or the no-answer label
    ranked: tuple[str, ...] = ()  # entry ids, best first; empty on NoAnswer or error
    scores: tuple[float, ...] = ()  # their scores in [0, 1]
    no_answer: bool = False  # the server said NoAnswer
    latency_ms: float | None = None  # None when the call failed
    error: str | None = None  # "STATUS_NAME: details" when the call failed
    clarify: tuple[str, ...] = ()  # the entry ids a Clarify offered; empty: none


def _ratio(numerator: float, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _rank(outcome: Outcome) -> int | None:
    if outcome.no_answer or outcome.label not in outcome.ranked:
        return None
    return outcome.ranked.index(outcome.label) + 1


def compute_metrics(outcomes: Sequence[Outcome], no_answer_label: str | None = None) -> dict:
    """Scores the server's answers against the gold labels.

    Ranking metrics cover in-scope queries (gold label other than ``no_answer_label``), with
    NoAnswer and failed calls as misses. The no-answer metrics treat NoAnswer as the positive
    class over all queries. A metric whose denominator is zero is None.

    Args:
        outcomes: One per query.
        no_answer_label: Label whose correct result is NoAnswer; None when there is none.

    Returns:
        ``n_queries``, ``accuracy_at_1``, ``recall_at_5``, ``mrr``; with a no-answer label
        also ``in_scope_accuracy`` (equal to accuracy_at_1, named as in CLINC150),
        ``no_answer_precision``, ``no_answer_recall``, ``no_answer_f1``; then
        ``latency_ms_p50``, ``latency_ms_p95`` (nearest rank, successful calls only),
        ``n_in_scope`` and ``n_errors``; ``clarify_rate`` (share of queries answered with a
        Clarify) and ``clarify_hit_rate`` (share of in-scope Clarify replies offering the
        right entry).
    """
    in_scope = [o for o in outcomes if o.label != no_answer_label]
    ranks = [_rank(o) for o in in_scope]
    accuracy = _ratio(sum(r == 1 for r in ranks), len(in_scope))
    metrics: dict[str, Any] = {
        "n_queries": len(outcomes),
        "accuracy_at_1": accuracy,
        "recall_at_5": _ratio(sum(r is not None and r <= 5 for r in ranks), len(in_scope)),
        "mrr": _ratio(sum(1 / r for r in ranks if r is not None), len(in_scope)),
    }
    if no_answer_label is not None:
        true_positives = sum(o.no_answer and o.label == no_answer_label for o in outcomes)
        precision = _ratio(true_positives, sum(o.no_answer for o in outcomes))
        recall = _ratio(true_positives, len(outcomes) - len(in_scope))
        if precision is None or recall is None:
            f1 = None
        else:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        metrics |= {
            "in_scope_accuracy": accuracy,
            "no_answer_precision": precision,
            "no_answer_recall": recall,
            "no_answer_f1": f1,
        }
    latencies = [o.latency_ms for o in outcomes if o.latency_ms is not None]
    metrics |= {
        "latency_ms_p50": percentile(latencies, 50) if latencies else None,
        "latency_ms_p95": percentile(latencies, 95) if latencies else None,
        "n_in_scope": len(in_scope),
        "n_errors": sum(o.error is not None for o in outcomes),
        "clarify_rate": _ratio(sum(bool(o.clarify) for o in outcomes), len(outcomes)),
        "clarify_hit_rate": _ratio(sum(o.label in o.clarify for o in in_scope),
                                   sum(bool(o.clarify) for o in in_scope)),
    }
    return metrics


def apply_threshold(outcomes: Iterable[Outcome], threshold: float) -> list[Outcome]:
    """Replays the server's thresholding offline: a best score below threshold is NoAnswer.

    Args:
        outcomes: Answers obtained with ``min_score=0``.
        threshold: Confidence threshold in [0, 1].

    Returns:
        The outcomes as a server with this threshold would have answered.
    """
    return [
        dataclasses.replace(o, ranked=(), scores=(), no_answer=True, clarify=())
        if o.scores and o.scores[0] < threshold
        else o
        for o in outcomes
    ]


def threshold_grid(top_scores: Iterable[float], step: float = 0.02) -> list[float]:
    """Returns thresholds every ``step`` over the span of the observed best scores.

    Args:
        top_scores: Best score of each answered query.
        step: Spacing of the grid.

    Returns:
        Multiples of step from just below the lowest to just above the highest score,
        clipped to [0, 1]; empty when there are no scores.
    """
    scores = list(top_scores)
    if not scores:
        return []
    # The 1e-9 keeps 0.3 / 0.1 = 2.9999999999999996 on grid point 3.
    lo = max(0, math.floor(min(scores) / step + 1e-9))
    hi = min(math.floor(1 / step + 1e-9), math.ceil(max(scores) / step - 1e-9))
    return [round(k * step, 6) for k in range(lo, hi + 1)]


def sweep_thresholds(
    outcomes: Sequence[Outcome], thresholds: Iterable[float], no_answer_label: str | None = None
) -> list[dict]:
    """Computes the accuracy / no-answer trade-off for each threshold.

    Args:
        outcomes: Answers obtained with ``min_score=0``.
        thresholds: Thresholds to try.
        no_answer_label: Label whose correct result is NoAnswer.

    Returns:
        One row per threshold: ``threshold``, ``answered`` (share of queries given answers),
        ``in_scope_accuracy``, and with a no-answer label ``no_answer_precision``,
        ``no_answer_recall``, ``no_answer_f1``.
    """
    rows = []
    for threshold in thresholds:
        applied = apply_threshold(outcomes, threshold)
        m = compute_metrics(applied, no_answer_label)
        row = {
            "threshold": threshold,
            "answered": _ratio(sum(bool(o.ranked) for o in applied), len(applied)),
            "in_scope_accuracy": m["accuracy_at_1"],
        }
        if no_answer_label is not None:
            row |= {k: m[k] for k in ("no_answer_precision", "no_answer_recall", "no_answer_f1")}
        rows.append(row)
    return rows


def best_threshold(rows: Sequence[dict]) -> float | None:
    """Returns the threshold of the sweep row with the highest no_answer_f1.

    Ties go to higher in-scope accuracy, then to the lower threshold. None when no row has
    an F1.
    """
    scored = [r for r in rows if r.get("no_answer_f1") is not None]
    if not scored:
        return None
    best = max(
        scored,
        key=lambda r: (r["no_answer_f1"], r["in_scope_accuracy"] or 0.0, -r["threshold"]),
    )
    return best["threshold"]


# Reports


def fmt_cell(value: Any) -> str:
    """A report cell: "-" for None, 3 decimals for a float under 10, 1 above."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_metrics(metrics: dict) -> str:
    """Renders metrics as a two-column table (None as "-")."""
    keys = [k for k, v in metrics.items() if not isinstance(v, dict | list)]
    width = max(map(len, keys))
    return "\n".join(f"{k:<{width}}  {fmt_cell(metrics[k]):>9}" for k in keys)


def format_sweep(rows: Sequence[dict], marked: float | None = None) -> str:
    """Renders a threshold sweep as a table; the row at ``marked`` gets a "<" marker."""
    if not rows:
        return "(no scores to sweep)"
    columns = [c for c in rows[0] if c != "threshold"]
    short = {
        "answered": "answered",
        "in_scope_accuracy": "in-scope acc",
        "no_answer_precision": "NA prec",
        "no_answer_recall": "NA recall",
        "no_answer_f1": "NA F1",
    }
    lines = [f"{'threshold':>9}" + "".join(f"{short.get(c, c):>13}" for c in columns)]
    for row in rows:
        mark = "  <" if marked is not None and row["threshold"] == marked else ""
        cells = "".join(f"{fmt_cell(row[c]):>13}" for c in columns)
        lines.append(f"{row['threshold']:>9.3f}{cells}{mark}")
    return "\n".join(lines)


# Running
