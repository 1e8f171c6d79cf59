"""Suggestions and lint on hand-made vectors (no model, no Milvus): clustering, routing a cluster
to an entry or a new entry, Feedback that names an entry, and the lint's findings; and what a
question's trip keeps for the log."""

from __future__ import annotations

import numpy as np
import pytest
from supportqa_server.answering.traffic import Trip
from supportqa_server.answering.types import Accepted, Answer, Done, NoAnswer, Timings, Transcript
from supportqa_server.errors import InvalidInput, TooLarge
from supportqa_server.knowledge.entries import EntryData
from supportqa_server.knowledge.questions import (
    ANSWERED,
    HELPFUL,
    NO_ANSWER,
    NOT_HELPFUL,
    Feedback,
    LoggedQuestion,
)
from supportqa_server.learning import EntryRows, LintOptions, SuggestOptions, lint, suggest
from supportqa_server.learning.suggest import NEW_ENTRY, PARAPHRASES, clusters
from supportqa_server.learning.vectors import entry_scores, unit

DIM = 16
RNG = np.random.default_rng(7)


def around(axis: int, n: int, spread: float = 0.15) -> np.ndarray:
    """n unit vectors near basis vector ``axis``."""
    base = np.zeros(DIM, np.float32)
    base[axis] = 1.0
    return unit(base + spread * RNG.standard_normal((n, DIM)).astype(np.float32))


def kb(*families: tuple[str, int]) -> tuple[dict[str, EntryData], EntryRows]:
    """Entries with a title and 4 paraphrases each, every row near the entry's axis."""
    entries, vectors = [], []
    for entry_id, axis in families:
        e = EntryData(id=entry_id, answer="", title=f"{entry_id} title",
                      questions=tuple(f"{entry_id} question {i}" for i in range(4)))
        entries.append(e)
        vectors.append(around(axis, len(e.texts())))
    return {e.id: e for e in entries}, EntryRows.of_entries(entries, vectors)


def logged(text: str, vector: np.ndarray, *, outcome: str = NO_ANSWER, n: list = [0],  # noqa: B006
           **kw) -> LoggedQuestion:
    n[0] += 1
    return LoggedQuestion(f"{n[0]:032x}", "kb", text, vector, outcome, float(n[0]), **kw)


def test_entry_scores_are_the_mean_of_each_entrys_best_rows():
    _, rows = kb(("a", 0), ("b", 1), ("c", 2))
    q = around(1, 5)
    got = entry_scores(q, rows, top_rows=3)
    sims = q @ rows.vectors.T
    for i in range(len(q)):
        for e, entry_id in enumerate(rows.entry_ids):
            best = np.sort(sims[i, rows.labels == e])[::-1][:3]
            assert got[i, e] == pytest.approx(best.mean(), abs=1e-5), entry_id
    assert (got.argmax(axis=1) == 1).all()
    own = np.flatnonzero(rows.labels == 1)[:5]  # leaving a question's own row out lowers b
    skipped = entry_scores(rows.vectors[own], rows, skip=own)
    assert (skipped[:, 1] < entry_scores(rows.vectors[own], rows)[:, 1]).all()


def test_clusters_join_one_meaning_and_keep_others_apart():
    vectors = np.concatenate([around(3, 4), around(9, 3), around(12, 1)])
    found = sorted(sorted(c.tolist()) for c in clusters(vectors, 0.5))
    assert found == [[0, 1, 2, 3], [4, 5, 6], [7]]
    assert clusters(vectors[:1], 0.5)[0].tolist() == [0] and clusters(vectors[:0], 0.5) == []


def test_a_cluster_near_an_entry_becomes_its_paraphrases_and_one_far_off_a_new_entry():
    entries, rows = kb(("card-lost", 0), ("refunds", 1))
    near_refunds = unit(around(1, 1, 0.0)[0] + 0.9 * around(5, 3, 0.05))  # cos ~0.7 to refunds
    far = around(10, 3, 0.1)
    log = ([logged(f"refund wording {i}", v) for i, v in enumerate(near_refunds)]
           + [logged(f"lisbon shop {i}", v) for i, v in enumerate(far)]
           + [logged("a lone question", around(13, 1)[0])])
    got = suggest(log, entries, rows, SuggestOptions(near=0.5))
    assert [(s.kind, s.entry_id, s.asked) for s in got] == [
        (NEW_ENTRY, "", 3), (PARAPHRASES, "refunds", 3)]
    new, para = got
    assert set(para.questions) == {f"refund wording {i}" for i in range(3)}
    assert para.score > 0.5 and "3 got no answer" in para.reason and not para.blocked
    assert set(new.questions) == {f"lisbon shop {i}" for i in range(3)} and new.score > 0.9
    assert "nothing in the knowledge base" in new.reason
    # a stricter threshold sends the refund cluster to a new entry, naming refunds as nearest
    strict = suggest(log, entries, rows, SuggestOptions(near=0.95))
    assert [s.kind for s in strict] == [NEW_ENTRY, NEW_ENTRY]
    assert "refunds" in {s.nearest_entry for s in strict}
    again = suggest(log, entries, rows, SuggestOptions(near=0.5))
    assert [s.id for s in again] == [s.id for s in got] and got[0].id != got[1].id


def test_feedback_naming_an_entry_proposes_its_question_alone():
    entries, rows = kb(("card-lost", 0), ("refunds", 1))
    q = logged("my card got nicked", around(7, 1)[0], outcome=ANSWERED,
               top=(("refunds", 0.6),), feedback=NOT_HELPFUL, feedback_entry="card-lost")
    helpful_same = logged("refund please", around(1, 1)[0], outcome=ANSWERED,
                          top=(("refunds", 0.8),), feedback=HELPFUL, feedback_entry="refunds")
    (s,) = suggest([q, helpful_same], entries, rows)
    assert (s.kind, s.entry_id, s.questions, s.asked) == (
        PARAPHRASES, "card-lost", ("my card got nicked",), 1)
    assert "Feedback named it" in s.reason


def test_an_entry_answered_and_called_not_helpful_is_passed_over():
    entries, rows = kb(("card-lost", 0), ("refunds", 1))
    vs = unit(around(1, 1, 0.0)[0] + 0.6 * around(5, 3, 0.05))
    bad = [logged(f"q{i}", v, outcome=ANSWERED, top=(("refunds", 0.6),), feedback=NOT_HELPFUL)
           for i, v in enumerate(vs)]
    (s,) = suggest(bad, entries, rows, SuggestOptions(near=0.3))
    assert s.kind == NEW_ENTRY and "not-helpful" in s.reason


def test_questions_already_among_the_texts_and_small_clusters_are_not_proposed():
    entries, rows = kb(("refunds", 1), ("card-lost", 0))
    log = [logged("Refunds  QUESTION 2", around(1, 1)[0]) for _ in range(3)]  # accepted before
    log += [logged("one off", around(11, 1)[0])]
    assert suggest(log, entries, rows) == []
    assert len(suggest(log, entries, rows, SuggestOptions(min_questions=1))) == 1


def test_articles_and_entries_with_images_are_blocked_from_accept():
    e = EntryData(id="guide", answer="", title="Guide", body_format="markdown")
    rows = EntryRows.of_entries([e], [around(2, len(e.texts()))])
    q = logged("guide?", around(2, 1)[0], outcome=ANSWERED, top=(("x", 0.5),),
               feedback=NOT_HELPFUL, feedback_entry="guide")
    (s,) = suggest([q], {"guide": e}, rows)
    assert "article" in s.blocked


def test_suggest_options_are_checked():
    entries, rows = kb(("a", 0))
    with pytest.raises(InvalidInput, match="min_questions"):
        suggest([], entries, rows, SuggestOptions(min_questions=0))


def test_lint_finds_confusable_entries_and_a_misplaced_paraphrase():
    a = EntryData(id="reset", answer="", title="reset", questions=("r1", "r2", "r3"))
    b = EntryData(id="change", answer="", title="change", questions=("c1", "c2", "c3"))
    c = EntryData(id="parcel", answer="", title="parcel", questions=("p1", "p2", "odd one"))
    vectors = [around(0, 4, 0.1), around(0, 4, 0.12), np.concatenate(
        [around(6, 3, 0.1), around(0, 1, 0.05)])]  # parcel's last paraphrase sits with reset
    report = lint(EntryRows.of_entries([a, b, c], vectors), LintOptions())
    pairs = {(p.entry_a, p.entry_b): p for p in report.confusable}
    assert pairs[("change", "reset")].similarity > 0.8  # by their centroids
    odd = [p for k, p in pairs.items() if "parcel" in k]  # by one near-duplicate paraphrase
    assert odd and all(p.similarity < 0.8 and p.text_similarity >= 0.9
                       and "odd one" in (p.text_a, p.text_b) for p in odd)
    (m,) = [m for m in report.misplaced if m.entry_id == "parcel"]
    assert m.paraphrase == "odd one"
    assert {m.entry_id for m in report.misplaced} <= {"parcel", "reset", "change"}
    assert m.other_entry in ("reset", "change") and m.other_score > m.own_score
    assert (report.entries, report.rows) == (3, 12)
    apart = lint(EntryRows.of_entries([a, c], [around(0, 4), around(6, 4)]))
    assert apart.confusable == () and apart.misplaced == ()


def test_a_trip_logs_the_typed_text_or_the_transcript_with_its_vector():
    entry = EntryData(id="e1", answer="x")
    trip = Trip("kb", "  card lost ")
    trip.searched += [("read text", 0.5, np.ones(2)), ("card lost", 1.0, np.zeros(2))]
    for ev in (Accepted("a" * 32), Answer(1, entry, 0.7, ("dense",), "m"),
               Answer(2, EntryData(id="e2", answer="y"), 0.6, ("dense",), "m"), Done(Timings())):
        trip.saw(ev)
    assert (trip.request_id, trip.outcome, trip.top, trip.done) == (
        "a" * 32, ANSWERED, [("e1", 0.7), ("e2", 0.6)], True)
    assert trip.question()[0] == "card lost" and not trip.question()[1].any()
    voice = Trip("kb")
    voice.saw(Transcript("partial", "en", False))
    voice.saw(Transcript(" my card is lost ", "en", True))
    voice.saw(NoAnswer("no", 0.2, 0.5))
    voice.searched.append(("my card is lost", 1.0, np.ones(2)))
    assert voice.outcome == NO_ANSWER and voice.best_score == 0.2
    assert voice.question()[0] == "my card is lost"
    assert Trip("kb").question() is None  # matched by CLIP alone: nothing to log


def test_feedback_is_checked_before_it_reaches_the_store():
    ok = Feedback("0" * 32, True)
    ok.check()
    with pytest.raises(InvalidInput, match="32 hex digits"):
        Feedback("req-1", True).check()
    with pytest.raises(InvalidInput, match="VERDICT_HELPFUL"):
        Feedback("0" * 32, None).check()
    with pytest.raises(TooLarge, match="comment"):
        Feedback("0" * 32, False, comment="x" * 1001).check()
