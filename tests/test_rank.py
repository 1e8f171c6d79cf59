"""Ranking on hand-made row hits: aggregation per entry, fusion with BM25, confidence."""

from __future__ import annotations

import math

import pytest
from supportqa_server.answering.rank import DENSE, LEXICAL, READ, RankOptions, rank
from supportqa_server.knowledge.store import RowHit


def options(**kw) -> RankOptions:
    """Options with a neutral base (best row, dense only, no head) under ``kw``."""
    return RankOptions(**({"aggregation": "max", "top_rows": 2, "knn": 10,
                           "knn_temperature": 0.05, "fusion": "rrf", "lexical_weight": 0.0,
                           "confidence": "best", "margin_weight": 0.0, "head_weight": 0.0,
                           "head_confidence": 0.0} | kw))


def hits(*rows: tuple[str, float]) -> list[RowHit]:
    """Row hits best first, as the store returns them."""
    return [RowHit(e, "question", f"{e} #{i}", s)
            for i, (e, s) in enumerate(sorted(rows, key=lambda r: -r[1]))]


# A: one very close paraphrase and a far one; B: three fairly close ones.
ONE_CLOSE_VS_MANY = hits(("A", 0.90), ("A", 0.50), ("B", 0.86), ("B", 0.85), ("B", 0.84))


def order(ranked) -> list[str]:
    return [r.entry_id for r in ranked]


def test_max_ranks_by_the_best_row():
    assert order(rank(ONE_CLOSE_VS_MANY, [], options(aggregation="max"))) == ["A", "B"]


def test_mean_top_ranks_by_the_mean_of_the_best_rows():
    # A: (0.90 + 0.50) / 2 = 0.70; B: (0.86 + 0.85) / 2 = 0.855.
    opts = options(aggregation="mean_top", top_rows=2)
    assert order(rank(ONE_CLOSE_VS_MANY, [], opts)) == ["B", "A"]


def test_mean_top_of_an_entry_with_fewer_rows_averages_what_it_has():
    opts = options(aggregation="mean_top", top_rows=3)
    ranked = rank(hits(("A", 0.80), ("B", 0.82), ("B", 0.70)), [], opts)
    assert order(ranked) == ["A", "B"]  # A 0.80 alone beats B's (0.82 + 0.70) / 2 = 0.76


@pytest.mark.parametrize(("temperature", "winner"), [(0.05, "A"), (0.1, "B")])
def test_knn_vote_depends_on_the_temperature(temperature, winner):
    # The 3 nearest rows: A 0.90, B 0.86, B 0.85. Votes exp((s - 0.90) / T):
    # T = 0.05: A 1, B e^-0.8 + e^-1 = 0.817 -> A; T = 0.1: B e^-0.4 + e^-0.5 = 1.277 -> B.
    opts = options(aggregation="knn", knn=3, knn_temperature=temperature)
    assert order(rank(ONE_CLOSE_VS_MANY, [], opts))[0] == winner


def test_knn_ranks_entries_without_votes_after_voted_ones_by_cosine():
    rows = hits(("A", 0.9), ("A", 0.89), ("C", 0.88), ("B", 0.5))
    ranked = rank(rows, [], options(aggregation="knn", knn=3))
    assert order(ranked) == ["A", "C", "B"]
    assert [r.score for r in ranked] == [0.9, 0.88, 0.5]


def test_confidence_is_the_best_cosine_whatever_the_aggregation():
    for agg in ("max", "mean_top", "knn"):
        ranked = rank(ONE_CLOSE_VS_MANY, [], options(aggregation=agg, knn=3,
                                                          knn_temperature=0.1))
        assert {r.entry_id: r.score for r in ranked} == {"A": 0.90, "B": 0.86}


def test_mean_top_confidence_averages_the_entry_best_rows():
    ranked = rank(ONE_CLOSE_VS_MANY, [], options(confidence="mean_top", top_rows=2))
    assert {r.entry_id: r.score for r in ranked} == pytest.approx({"A": 0.70, "B": 0.855})


def test_confidence_is_clipped_to_the_unit_interval():
    ranked = rank(hits(("A", 1.2), ("B", -0.3)), [RowHit("C", "title", "c", 7.5)],
                  options(lexical_weight=1.0))
    assert {r.entry_id: r.score for r in ranked} == {"A": 1.0, "B": 0.0, "C": 0.0}
    assert all(0.0 <= r.score <= 1.0 for r in ranked)


def test_rrf_fusion_lets_a_heavy_enough_bm25_route_reorder():
    dense = hits(("A", 0.80), ("B", 0.79))
    lexical = [RowHit("B", "question", "b", 12.0)]
    # RRF with k = 60: A 1/61 = 0.016393; B 1/62 + w/61 -> 0.016293 at w = 0.01, 0.03252 at 1.
    assert order(rank(dense, lexical, options(lexical_weight=0.01))) == ["A", "B"]
    assert order(rank(dense, lexical, options(lexical_weight=1.0))) == ["B", "A"]
    assert order(rank(dense, lexical, options(lexical_weight=0.0))) == ["A", "B"]


def test_score_fusion_adds_the_bm25_share_of_the_best():
    dense = hits(("A", 0.80), ("B", 0.75))
    lexical = [RowHit("B", "question", "b", 10.0), RowHit("A", "question", "a", 5.0)]
    opts = options(fusion="score", lexical_weight=0.2)
    ranked = rank(dense, lexical, opts)
    # A 0.80 + 0.2 * 5/10 = 0.90; B 0.75 + 0.2 * 10/10 = 0.95.
    assert order(ranked) == ["B", "A"]
    assert [r.fused for r in ranked] == pytest.approx([0.95, 0.90])
    assert [r.score for r in ranked] == [0.75, 0.80]  # fusion reorders, confidence stays


def test_lexical_only_entries_come_last_with_zero_confidence_and_routes_say_who_found_what():
    dense = hits(("A", 0.80))
    lexical = [RowHit("A", "question", "a", 3.0), RowHit("Z", "answer", "z", 9.0)]
    for fusion in ("rrf", "score"):
        ranked = rank(dense, lexical, options(fusion=fusion, lexical_weight=0.1),
                      extra_routes=[READ])
        assert order(ranked) == ["A", "Z"]
        assert ranked[0].routes == {DENSE, LEXICAL, READ}
        assert ranked[1].routes == {LEXICAL, READ} and ranked[1].score == 0.0


def test_margin_bonus_rewards_a_clear_winner_only():
    clear = rank(hits(("A", 0.70), ("B", 0.50)), [], options(margin_weight=0.5))
    assert clear[0].score == pytest.approx(0.70 + 0.5 * 0.20)
    tight = rank(hits(("A", 0.70), ("B", 0.69)), [], options(margin_weight=0.5))
    assert tight[0].score == pytest.approx(0.705)
    assert clear[1].score == 0.50  # only the first entry gains
    capped = rank(hits(("A", 0.95), ("B", 0.10)), [], options(margin_weight=1.0))
    assert capped[0].score == 1.0


def test_nothing_found_ranks_nothing():
    assert rank([], [], options(aggregation="knn")) == []


@pytest.mark.parametrize(
    "bad",
    [{"aggregation": "median"}, {"fusion": "max"}, {"confidence": "vote"}, {"top_rows": 0},
     {"knn_temperature": 0.0}, {"lexical_weight": -1.0}],
)
def test_check_names_the_bad_option(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        options(**bad).check()


def test_default_options_pass_their_own_check():
    options().check()
    assert math.isfinite(options().rrf_k)


def test_an_article_counts_by_its_best_passage_not_the_mean_of_many():
    # A long article: one passage on the question, many that are not; and a short entry
    # whose three rows are all fairly close.
    dense = [RowHit("manual", "passage", "reset", 0.80)]
    dense += [RowHit("manual", "passage", f"other {i}", 0.10) for i in range(20)]
    dense += [RowHit("faq", "question", f"q{i}", 0.70) for i in range(3)]
    ranked = rank(dense, [], options(aggregation="mean_top", top_rows=3,
                                     confidence="mean_top"))
    assert [r.entry_id for r in ranked] == ["manual", "faq"]
    assert ranked[0].score == pytest.approx(0.80)  # its confidence is the passage's cosine
    assert ranked[0].matched_text == "reset"


def test_only_the_best_excerpt_of_an_answer_counts():
    # A long answer's excerpts are one row in the mean: many close excerpts must not outvote
    # an entry whose title, paraphrase and answer all match a little better.
    dense = [RowHit("long", "excerpt", f"x{i}", 0.75 - i * 0.001) for i in range(6)]
    dense += [RowHit("long", "answer", "whole", 0.40), RowHit("long", "title", "t", 0.30)]
    dense += [RowHit("faq", "question", "q", 0.70), RowHit("faq", "title", "t2", 0.66),
              RowHit("faq", "answer", "a", 0.62)]
    ranked = rank(dense, [], options(aggregation="mean_top", top_rows=3,
                                     confidence="mean_top"))
    assert [r.entry_id for r in ranked] == ["faq", "long"]
    assert ranked[1].score == pytest.approx((0.75 + 0.40 + 0.30) / 3)


def test_a_long_answer_is_searched_in_excerpts_too():
    from supportqa_server.knowledge.entries import EntryData, excerpts

    short = "One. Two. Three."
    assert excerpts(short) == []
    answer = "A one. B two? C three! D four. E five."
    assert excerpts(answer) == ["A one. B two? C three!", "D four. E five."]
    kinds = [k for k, _ in EntryData(id="e", title="T", answer=answer).texts()]
    assert kinds == ["title", "answer", "excerpt", "excerpt"]
