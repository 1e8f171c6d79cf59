"""The answers a ranking becomes: the threshold judges the best guess, not a lesser one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from supportqa_server.answering.pipeline import Answer, AskRequest, NoAnswer, Pipeline
from supportqa_server.answering.rank import RankedEntry
from supportqa_server.knowledge.store import EntryData
from supportqa_server.runtime.settings import Settings


@pytest.fixture
def pipeline(tmp_path):
    p = Pipeline(Settings(data_dir=tmp_path, speech_model="", ocr=False, clip_model=""))
    stored = {i: EntryData(id=i, answer=f"answer {i}") for i in ("a", "b", "c", "d")}
    p.store = SimpleNamespace(entry=lambda kb, entry_id: stored.get(entry_id))
    return p


def ranked(*pairs: tuple[str, float]) -> list[RankedEntry]:
    return [RankedEntry(e, s, fused=-i) for i, (e, s) in enumerate(pairs)]


def test_an_unconfident_best_guess_is_no_answer_even_when_a_lesser_entry_passes(pipeline):
    out = pipeline._answers(AskRequest(text="q"), ranked(("a", 0.40), ("b", 0.60)), 0.44)
    assert len(out) == 1 and isinstance(out[0], NoAnswer)
    assert out[0].best_score == pytest.approx(0.40)
    assert "0.40, below the threshold 0.44" in out[0].reason


def test_later_answers_must_pass_the_threshold_too(pipeline):
    out = pipeline._answers(
        AskRequest(text="q", top_k=3), ranked(("a", 0.70), ("b", 0.30), ("c", 0.50)), 0.44
    )
    assert [(a.rank, a.entry.id) for a in out] == [(1, "a"), (2, "c")]
    assert all(isinstance(a, Answer) for a in out)


def test_a_deleted_entry_gives_way_to_the_next_best_guess(pipeline):
    out = pipeline._answers(AskRequest(text="q"), ranked(("gone", 0.90), ("b", 0.40)), 0.44)
    assert isinstance(out[0], NoAnswer) and out[0].best_score == pytest.approx(0.40)
    out = pipeline._answers(AskRequest(text="q"), ranked(("gone", 0.90), ("b", 0.50)), 0.44)
    assert [a.entry.id for a in out] == ["b"]
    out = pipeline._answers(AskRequest(text="q"), ranked(("gone", 0.90)), 0.44)
    assert isinstance(out[0], NoAnswer) and out[0].reason.endswith("nothing matched")


def test_an_article_answers_with_the_passage_that_matched(tmp_path):
    from supportqa_server.knowledge.articles import Passage

    p = Pipeline(Settings(data_dir=tmp_path, speech_model="", ocr=False, clip_model=""))
    article = EntryData(id="refunds.md", answer="", title="Refunds", passages=(
        Passage(("Cards",), "Card refunds take five days. Banks may add two.", 10, 60),
        Passage(("Cash",), "Cash is refunded at the till. Bring the receipt.", 70, 120),
    ))
    p.store = SimpleNamespace(entry=lambda kb, entry_id: article)
    row = article.texts()[2][1]  # the second passage's row: "Refunds > Cash\n..."
    assert row.startswith("Refunds > Cash\n")
    out = p._answers(AskRequest(text="q"), [RankedEntry("refunds.md", 0.8, 1.0, set(), row)],
                     0.44, "do I have to bring my receipt")
    (a,) = out
    assert a.passage.headings == ("Cash",) and (a.passage.start, a.passage.end) == (70, 120)
    assert a.short_answer == "Bring the receipt."
    # Matched on its title row: the article's first passage stands in.
    out = p._answers(AskRequest(text="q"), [RankedEntry("refunds.md", 0.8, 1.0, set(),
                                                        "Refunds")], 0.44, "refunds")
    assert out[0].passage.headings == ("Cards",)
