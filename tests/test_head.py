"""The entry head (head.py) and how ranking uses it, on small made-up vectors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from supportqa_server.head import EntryHead, HeadTrainer, train_head
from supportqa_server.rank import RankOptions, rank
from supportqa_server.store import RowHit


def clusters(seed: int = 0, per: int = 30, dim: int = 16, spread: float = 0.6):
    """Three entries' paraphrase vectors around three random unit centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim))
    vecs, labels = [], []
    for i, c in enumerate(centres):
        x = c + spread * rng.normal(size=(per, dim))
        vecs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        labels += [f"e{i}"] * per
    return np.concatenate(vecs).astype(np.float32), labels, centres


def test_head_learns_which_entry_a_vector_belongs_to():
    x, labels, centres = clusters()
    head = train_head(x, labels, c=10.0, revision=7)
    assert head.entry_ids == ("e0", "e1", "e2") and head.revision == 7
    probs = head.probabilities(centres / np.linalg.norm(centres, axis=1, keepdims=True))
    for i, p in enumerate(probs):
        assert max(p, key=p.get) == f"e{i}"
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-5)
    top1 = head.probabilities(x, top=1)
    assert all(len(p) == 1 for p in top1)
    assert np.mean([next(iter(p)) == y for p, y in zip(top1, labels, strict=True)]) > 0.9


def test_stronger_regularisation_gives_flatter_probabilities():
    x, labels, centres = clusters(spread=0.3)
    q = centres[:1] / np.linalg.norm(centres[:1])
    loose = train_head(x, labels, c=100.0).probabilities(q)[0]["e0"]
    tight = train_head(x, labels, c=0.01).probabilities(q)[0]["e0"]
    assert loose > tight > 1 / 3


def test_trainer_steps_until_converged_and_keeps_its_state():
    x, labels, _ = clusters(seed=1)
    trainer = HeadTrainer(x, labels, c=10.0, max_iter=200)
    assert trainer.step() is False and trainer.iterations == 1  # the first step measures
    steps = 1
    while not trainer.step():
        steps += 1
    assert 1 < steps and trainer.iterations <= 200
    stepped = trainer.head()
    once = train_head(x, labels, c=10.0, max_iter=200)
    assert np.allclose(stepped.weight, once.weight, atol=1e-3)


def test_a_step_takes_as_many_iterations_as_its_time_allows(monkeypatch):
    x, labels, _ = clusters(seed=2)

    def steps(budget_iterations: float) -> tuple[int, int]:
        trainer = HeadTrainer(x, labels, c=10.0, max_iter=200)
        trainer.step()  # measures one iteration
        monkeypatch.setattr(HeadTrainer, "STEP_SECONDS",
                            trainer._per_iteration_s * budget_iterations)
        n = 1
        while not trainer.step():
            n += 1
        return n, trainer.iterations

    few, _ = steps(1000)
    many, iterations = steps(0)  # below one iteration: one a step
    assert few <= 4 < 10 <= many <= iterations


@pytest.mark.parametrize(
    ("vectors", "labels", "c", "message"),
    [
        (np.zeros((0, 4)), [], 1.0, "0 vectors"),
        (np.zeros((2, 4)), ["a"], 1.0, "2 vectors for 1 labels"),
        (np.eye(4)[:2], ["a", "a"], 1.0, "two entries"),
        (np.eye(4)[:2], ["a", "b"], 0.0, "must be positive"),
    ],
)
def test_unusable_training_sets_are_refused(vectors, labels, c, message):
    with pytest.raises(ValueError, match=message):
        HeadTrainer(vectors, labels, c=c)


def hits(pairs):
    return [RowHit(e, "question", f"{e} text", s) for e, s in pairs]


SHIPPED = RankOptions(aggregation="mean_top", top_rows=3, fusion="score", lexical_weight=0.2,
                      confidence="mean_top", head_weight=0.5)


def test_head_reorders_close_entries_but_leaves_confidence_alone():
    dense = hits([("a", 0.62), ("b", 0.60), ("a", 0.60), ("b", 0.58)])
    plain = rank(dense, [], dataclasses.replace(SHIPPED, head_weight=0.0))
    assert [r.entry_id for r in plain] == ["a", "b"]
    with_head = rank(dense, [], SHIPPED, head={"b": 0.8, "a": 0.1, "zzz": 0.1})
    assert [r.entry_id for r in with_head] == ["b", "a"]
    # The confidence (threshold side) is still the mean cosine; an entry retrieval did not
    # find ("zzz") is not added.
    assert {r.entry_id: r.score for r in with_head} == {r.entry_id: r.score for r in plain}
    # A head cannot lift an entry past a clear retrieval winner at weight 0.5.
    far = rank(hits([("a", 0.9), ("b", 0.4)]), [], SHIPPED, head={"b": 0.7, "a": 0.3})
    assert far[0].entry_id == "a"


def test_head_joins_rrf_as_a_ranked_route():
    opts = RankOptions(fusion="rrf", head_weight=1.0)
    dense = hits([("a", 0.62), ("b", 0.60)])
    assert [r.entry_id for r in rank(dense, [], opts)] == ["a", "b"]
    # Dense ranks a first, the head b: at equal weights both sum 1/61 + 1/62.
    both = rank(dense, [], opts, head={"b": 0.9, "a": 0.1})
    assert both[0].fused == pytest.approx(both[1].fused)
    assert rank(dense, [], dataclasses.replace(opts, head_weight=2.0),
                head={"b": 0.9, "a": 0.1})[0].entry_id == "b"


def test_negative_head_weight_is_refused():
    with pytest.raises(ValueError, match="head_weight"):
        RankOptions(head_weight=-0.1).check()


def test_probabilities_keep_the_top_entries_only():
    head = EntryHead(("a", "b", "c"), np.eye(3, dtype=np.float32) * 5, np.zeros(3, np.float32), 0)
    (p,) = head.probabilities(np.array([[1.0, 0.2, 0.0]], np.float32), top=2)
    assert set(p) == {"a", "b"} and p["a"] > p["b"]


def test_transcripts_rank_with_their_own_head_weight():
    from supportqa_server.pipeline import Pipeline
    from supportqa_server.settings import Settings

    p = Pipeline(Settings(head_weight=0.5, head_weight_voice=0.1))
    assert p.rank_options.head_weight == 0.5
    assert p._heard_rank_options.head_weight == 0.1
    assert p._head_on
    assert not Pipeline(Settings(head_weight=0.0, head_weight_voice=0.0))._head_on
    assert Pipeline(Settings(head_weight=0.0, head_weight_voice=0.2))._head_on


@pytest.mark.slow
async def test_a_knowledge_base_of_another_model_gets_no_head_and_no_crash(tmp_path):
    """Written with 8-d vectors, served with MiniLM's 384: the head is off, the server up."""
    import asyncio

    from supportqa_server.pipeline import Pipeline
    from supportqa_server.settings import Settings
    from supportqa_server.store import EntryData, KnowledgeStore

    store = KnowledgeStore(str((tmp_path / "milvus.db").resolve()), 8)
    store.open()
    entries = [EntryData(id=i, answer=f"answer {i}", questions=(f"question {i}",))
               for i in ("a", "b")]
    store.upsert("other", entries, [np.eye(8, dtype=np.float32)[:2] for _ in entries])
    store.close()
    p = Pipeline(Settings(data_dir=tmp_path, speech_model="", ocr=False, clip_model=""))
    await p.start()
    try:
        for _ in range(100):
            if (state := p.head_state("other")) != "training":
                break
            await asyncio.sleep(0.1)
        assert state == "off"
        assert p.ready
    finally:
        await p.close()
