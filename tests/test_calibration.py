"""Each knowledge base's own threshold: the measurement (calibration.py), who sets it
(knowledge_bases.py), and a real server that calibrates the sample knowledge base."""

from __future__ import annotations

import numpy as np
import pytest
from supportqa_server.answering.calibration import (
    GRID,
    MIN_HELD_OUT,
    Calibrator,
    hold_out,
    out_of_scope_pool,
    youden,
)
from supportqa_server.answering.knowledge_bases import KnowledgeBases
from supportqa_server.answering.rank import RankOptions
from supportqa_server.runtime.settings import Settings


def test_youden_takes_the_lowest_threshold_that_separates_both_samples():
    answerable = np.array([0.8, 0.85, 0.9, 0.75, 0.7])
    right = np.ones(5, bool)
    refusable = np.linspace(0.2, 0.45, 100)
    t, answered, refused = youden(right, answerable, refusable)
    assert 0.44 < t <= 0.7 and answered == 1.0  # every answerable kept
    assert refused >= 0.99  # all but at most one pool question refused
    assert t == pytest.approx(0.4475, abs=0.003)  # the lowest such threshold on the grid


def test_youden_counts_a_wrongly_ranked_question_as_unanswered():
    answerable = np.array([0.9, 0.9, 0.9, 0.9])
    right = np.array([True, True, False, False])
    _, answered, _ = youden(right, answerable, np.array([0.2]))
    assert answered == 0.5


def test_youden_prefers_the_lower_of_thresholds_one_pool_question_apart():
    # a pool question scoring as high as answerable ones: refusing it would cost a fifth of
    # the answerable; within one pool question of the best, the lower threshold wins
    pool = np.array([0.2] * 99 + [0.8])
    t, answered, refused = youden(np.ones(5, bool), np.array([0.7, 0.75, 0.8, 0.85, 0.9]), pool)
    assert t < 0.7 and answered == 1.0 and refused == 0.99


def test_hold_out_takes_a_fifth_of_the_paraphrases_of_entries_with_enough():
    labels = ["a"] * 11 + ["b"] * 2 + ["c"] * 5
    kinds = ["title"] + ["question"] * 10 + ["question"] * 2 + ["answer"] + ["question"] * 4
    held = hold_out(labels, kinds, seed=1)
    assert [labels[i] for i in held].count("a") == 2
    assert "b" not in [labels[i] for i in held]  # two paraphrases: kept whole
    assert [labels[i] for i in held].count("c") == 1  # four: at least one
    assert all(kinds[i] == "question" for i in held)
    assert held == hold_out(labels, kinds, seed=1)  # the same rows for the same revision


def test_the_bundled_pool_is_general_questions():
    pool = out_of_scope_pool()
    assert len(pool) >= 100
    assert not any(q.startswith("#") for q in pool)


def _options() -> RankOptions:
    return RankOptions.from_settings(Settings())


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_calibrator_puts_the_threshold_between_its_entries_and_the_pool():
    rng = np.random.default_rng(0)
    dim, entries, per = 32, 6, 21
    centres = _unit(rng.normal(size=(entries, dim)))
    labels, kinds, vecs, texts = [], [], [], []
    for e in range(entries):
        for j in range(per):
            labels.append(f"e{e}")
            kinds.append("title" if j == 0 else "question")
            vecs.append(centres[e] + 0.25 * rng.normal(size=dim) / np.sqrt(dim))
            texts.append(f"entry {e} text {j}")
    pool_vecs = _unit(rng.normal(size=(40, dim)))  # random directions: far from every entry
    cal = Calibrator(7, labels, _unit(np.array(vecs)), texts, kinds,
                     ([f"pool {i}" for i in range(40)], pool_vecs), _options(), {"c": 10.0})
    assert cal.usable
    while not cal.step():
        pass
    result = cal.result()
    assert result is not None and result.revision == 7
    assert result.held_out == len(cal.held) >= MIN_HELD_OUT
    assert result.answered > 0.9 and result.refused > 0.9
    # the held-out paraphrases sit near cosine 0.9 to their entry, the pool near 0.2
    assert 0.2 < result.threshold < 0.9 and 0.2 < result.threshold_cosine < 0.9
    assert result.threshold in GRID
    assert "calibrated" in result.describe()


def test_too_few_paraphrases_leave_the_fallback():
    vecs = _unit(np.eye(4, 8) + 0.01)
    cal = Calibrator(1, ["a", "a", "b", "b"], vecs, ["t", "q", "t", "q"],
                     ["title", "question", "title", "question"],
                     (["pool"], vecs[:1]), _options(), {"c": 10.0})
    assert not cal.usable
    assert cal.step() and cal.result() is None


def test_an_operator_pin_wins_and_says_so():
    kbs = KnowledgeBases(Settings(thresholds={"banking": 0.61}), head_on=True,
                         model_exec=None, store_exec=None)
    assert kbs.threshold("banking") == 0.61
    assert kbs.threshold_source("banking") == "pinned (SUPPORTQA_THRESHOLDS)"
    assert kbs.threshold("other") == Settings().fallback_threshold
    assert "while calibrating" in kbs.threshold_source("other")
    everywhere = KnowledgeBases(Settings(threshold=0.5), head_on=True, model_exec=None,
                                store_exec=None)
    assert everywhere.threshold("other") == 0.5
    assert everywhere.threshold_source("other") == "pinned (SUPPORTQA_THRESHOLD)"
    off = KnowledgeBases(Settings(calibrate=False), head_on=True, model_exec=None,
                         store_exec=None)
    assert "SUPPORTQA_CALIBRATE is off" in off.threshold_source("other")


@pytest.mark.slow
async def test_a_served_knowledge_base_calibrates_its_own_threshold(client):
    reply = await client.stats("default")
    kb = reply.knowledge_bases[0]
    assert kb.threshold_source.startswith("calibrated"), kb.threshold_source
    assert 0.2 < kb.threshold < 0.9
    off_topic = await client.ask("what is the boiling point of tungsten in kelvin")
    assert off_topic.HasField("no_answer")
    assert off_topic.no_answer.threshold == pytest.approx(kb.threshold, abs=1e-6)
    on_topic = await client.ask("someone nicked my debit card out of my bag")
    assert on_topic.answers[0].entry_id == "card-stolen"
    assert on_topic.answers[0].score >= kb.threshold


@pytest.mark.slow
async def test_a_write_under_way_holds_the_head_and_calibration_back(tmp_path):
    """A bulk ingest embeds its next batch while the last one is committed: a fit begun in
    between would be stale at once and would take the model thread from the embedding."""
    import asyncio

    from conftest import SAMPLE_KB
    from supportqa.client import AsyncSupportClient
    from supportqa.knowledge_file import read_entries
    from supportqa_server.answering.knowledge_bases import HEAD_SETTLE_S
    from supportqa_server.answering.pipeline import Pipeline
    from supportqa_server.api.server import running_server
    from supportqa_tools.evaluation import wait_for_head

    settings = Settings(port=0, data_dir=tmp_path, speech_model="", clip_model="", ocr=False)
    pipeline = Pipeline(settings)
    async with running_server(settings, pipeline) as target:
        async with AsyncSupportClient(target, timeout=180) as c:
            with pipeline.kbs.writing("default"):  # as a next batch being embedded would
                await c.upsert(read_entries(SAMPLE_KB))
                await asyncio.sleep(4 * HEAD_SETTLE_S)
                kb = (await c.stats("default")).knowledge_bases[0]
                assert kb.head == "training" and pipeline.kbs.state("default").head is None
                assert "while calibrating" in kb.threshold_source
            assert await wait_for_head(c, "default", timeout_s=180) == "ready"
            kb = (await c.stats("default")).knowledge_bases[0]
            assert kb.threshold_source.startswith("calibrated"), kb.threshold_source
