"""The entry head (head.py) and how ranking uses it, on small made-up vectors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from supportqa_server.answering import head as head_module
from supportqa_server.answering.head import EntryHead, HeadTrainer, WordFeatures, train_head
from supportqa_server.answering.rank import RankOptions, rank
from supportqa_server.knowledge.store import RowHit
from supportqa_server.runtime.settings import Settings
from test_rank import options


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


def test_word_features_are_tf_idf_of_words_and_word_pairs():
    words = WordFeatures(["Top up my card", "top-up failed", "card lost", "a b"], max_terms=100)
    # df >= 2 only: "top", "up", "card" and "top up" (4 rows, each term in 2 of them)
    assert sorted(words.index) == ["card", "top", "top up", "up"]
    idf = np.log(5 / 3) + 1
    assert np.allclose(words.idf, idf)
    rows, cols, vals = words.transform(["top up, top!", "nothing known", "card"])
    assert rows.tolist() == [0, 0, 0, 2]  # the second text has no known term
    at = {int(c): float(v) for r, c, v in zip(rows, cols, vals, strict=True) if r == 0}
    tf = np.array([1 + np.log(2), 1.0, 1.0])  # top x2, up, "top up" ("up top" is unknown)
    expected = tf / np.linalg.norm(tf)
    assert [at[words.index[t]] for t in ("top", "up", "top up")] == pytest.approx(expected)
    assert vals[rows == 2] == pytest.approx([1.0])
    few = WordFeatures(["ab cd", "ab cd", "cd ef", "cd ef", "ab"], max_terms=2)
    assert sorted(few.index) == ["ab", "cd"]  # the two most frequent terms (df 3 and 4)


def test_words_separate_entries_whose_vectors_do_not():
    """Two entries with the same vectors ("card arrived" vs "card not arrived" can embed
    alike): the vector-only head cannot tell them apart, the head with words can."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=(1, 8)).astype(np.float32)
    x = np.repeat(v / np.linalg.norm(v), 12, axis=0)
    labels = ["arrived"] * 6 + ["missing"] * 6
    texts = [f"my card arrived {i}" for i in range(6)] + [f"my card is missing {i}"
                                                          for i in range(6)]
    q = x[:2]
    blind = train_head(x, labels).probabilities(q, top=2)
    assert blind[0]["arrived"] == pytest.approx(0.5, abs=1e-3)
    head = train_head(x, labels, texts=texts)
    assert head.words is not None and head.word_weight.shape == (2, len(head.words))
    seen = head.probabilities(q, ["card arrived today", "card still missing"], top=2)
    assert seen[0]["arrived"] > 0.7 and seen[1]["missing"] > 0.7
    with pytest.raises(ValueError, match="text"):
        head.probabilities(q)


def test_a_batch_of_questions_scores_as_each_question_alone():
    """The batched word product (one sum per question's run of terms) matches the lone one,
    for questions with no known word among them."""
    rng = np.random.default_rng(1)
    texts = [f"{a} {b} card" for a in ("lost", "stolen", "blocked") for b in ("my", "a")] * 2
    labels = [t.split()[0] for t in texts]
    head = train_head(rng.normal(size=(len(texts), 8)).astype(np.float32), labels, texts=texts)
    questions = ["my lost card", "zzz unknown", "blocked card card", "qqq", "a stolen card"]
    q = rng.normal(size=(len(questions), 8)).astype(np.float32)
    batch = head.probabilities(q, questions, top=3)
    for i, text in enumerate(questions):
        (alone,) = head.probabilities(q[i : i + 1], [text], top=3)
        assert batch[i].keys() == alone.keys()
        assert list(batch[i].values()) == pytest.approx(list(alone.values()), abs=1e-6)


def test_many_entries_keep_fewer_words(monkeypatch):
    monkeypatch.setattr(head_module, "MAX_WORD_WEIGHTS", 6)
    texts = ["alpha beta", "alpha beta", "gamma delta", "gamma delta"]
    trainer = HeadTrainer(np.eye(4, dtype=np.float32), ["a", "a", "b", "b"], texts=texts)
    assert len(trainer.words) == 3  # 6 weights over 2 entries
    with pytest.raises(ValueError, match="3 texts for 4 labels"):
        HeadTrainer(np.eye(4, dtype=np.float32), ["a", "a", "b", "b"], texts=texts[:3])


def hits(pairs):
    return [RowHit(e, "question", f"{e} text", s) for e, s in pairs]


SHIPPED = RankOptions.from_settings(Settings())
assert (SHIPPED.aggregation, SHIPPED.fusion, SHIPPED.head_weight) == ("mean_top", "score", 0.5)


def test_head_reorders_close_entries_but_leaves_confidence_alone():
    dense = hits([("a", 0.62), ("b", 0.60), ("a", 0.60), ("b", 0.58)])
    plain = rank(dense, [], dataclasses.replace(SHIPPED, head_weight=0.0))
    assert [r.entry_id for r in plain] == ["a", "b"]
    head = {"b": 0.8, "a": 0.1, "zzz": 0.1}
    ordering_only = dataclasses.replace(SHIPPED, head_confidence=0.0)
    with_head = rank(dense, [], ordering_only, head=head)
    assert [r.entry_id for r in with_head] == ["b", "a"]
    # Without head_confidence the confidence (threshold side) is still the mean cosine; an
    # entry retrieval did not find ("zzz") is not added.
    assert {r.entry_id: r.score for r in with_head} == {r.entry_id: r.score for r in plain}
    # With it (shipped: 0.3) the head's probability joins the confidence: (cos + w p) / (1 + w)
    mixed = {r.entry_id: r.score for r in rank(dense, [], SHIPPED, head=head)}
    cos = {r.entry_id: r.score for r in plain}
    w = SHIPPED.head_confidence
    assert w > 0 and set(mixed) == {"a", "b"}
    for e in ("a", "b"):
        assert mixed[e] == pytest.approx((cos[e] + w * head[e]) / (1 + w))
    assert mixed["b"] > cos["b"] and mixed["a"] < cos["a"]
    # A head cannot lift an entry past a clear retrieval winner at weight 0.5.
    far = rank(hits([("a", 0.9), ("b", 0.4)]), [], SHIPPED, head={"b": 0.7, "a": 0.3})
    assert far[0].entry_id == "a"


def test_head_joins_rrf_as_a_ranked_route():
    opts = options(fusion="rrf", head_weight=1.0)
    dense = hits([("a", 0.62), ("b", 0.60)])
    assert [r.entry_id for r in rank(dense, [], opts)] == ["a", "b"]
    # Dense ranks a first, the head b: at equal weights both sum 1/61 + 1/62.
    both = rank(dense, [], opts, head={"b": 0.9, "a": 0.1})
    assert both[0].fused == pytest.approx(both[1].fused)
    assert rank(dense, [], dataclasses.replace(opts, head_weight=2.0),
                head={"b": 0.9, "a": 0.1})[0].entry_id == "b"


def test_negative_head_weight_is_refused():
    with pytest.raises(ValueError, match="head_weight"):
        options(head_weight=-0.1).check()


def test_probabilities_keep_the_top_entries_only():
    head = EntryHead(("a", "b", "c"), np.eye(3, dtype=np.float32) * 5, np.zeros(3, np.float32), 0)
    (p,) = head.probabilities(np.array([[1.0, 0.2, 0.0]], np.float32), top=2)
    assert set(p) == {"a", "b"} and p["a"] > p["b"]


def test_transcripts_rank_with_their_own_head_weight():
    from supportqa_server.answering.pipeline import Pipeline
    from supportqa_server.runtime.settings import Settings

    p = Pipeline(Settings(head_weight=0.5, head_weight_voice=0.1))
    assert p.rank_options.head_weight == 0.5
    assert p.heard_rank_options.head_weight == 0.1
    assert p.kbs.head_on
    assert not Pipeline(Settings(head_weight=0.0, head_weight_voice=0.0,
                                 head_confidence=0.0)).kbs.head_on
    # the head's probability in the confidence needs a head even when nothing ranks by it
    assert Pipeline(Settings(head_weight=0.0, head_weight_voice=0.0)).kbs.head_on
    assert Pipeline(Settings(head_weight=0.0, head_weight_voice=0.2)).kbs.head_on


@pytest.mark.slow
async def test_a_knowledge_base_of_another_model_gets_no_head_and_no_crash(tmp_path):
    """Written with 8-d vectors, served with MiniLM's 384: the head is off, the server up."""
    import asyncio

    from supportqa_server.answering.pipeline import Pipeline
    from supportqa_server.knowledge.store import EntryData, KnowledgeStore
    from supportqa_server.runtime.settings import Settings

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
            if (state := p.kbs.head_state("other")) != "training":
                break
            await asyncio.sleep(0.1)
        assert state == "off"
        assert p.ready
    finally:
        await p.close()


@pytest.mark.slow
async def test_the_pipeline_builds_and_fits_its_head_on_the_model_thread(tmp_path, monkeypatch):
    """All torch work stays on the model thread: a parallel torch op elsewhere starts a second
    OpenMP team and slowed every later encode ~2x. The head reads words by default."""
    import asyncio
    import threading

    from supportqa_server.answering import knowledge_bases as heads_module
    from supportqa_server.answering.pipeline import Answer, AskRequest, Pipeline
    from supportqa_server.knowledge.store import EntryData
    from supportqa_server.runtime.settings import Settings

    monkeypatch.setattr(heads_module, "HEAD_SETTLE_S", 0.05)
    threads: list[str] = []
    init, step = HeadTrainer.__init__, HeadTrainer.step

    def spy_init(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        init(self, *args, **kwargs)

    def spy_step(self):
        threads.append(threading.current_thread().name)
        return step(self)

    scored: list[tuple[str, list[str]]] = []
    probabilities = EntryHead.probabilities

    def spy_probabilities(self, vectors, texts=None, top=50):
        scored.append((threading.current_thread().name, list(texts or ())))
        return probabilities(self, vectors, texts, top)

    monkeypatch.setattr(HeadTrainer, "__init__", spy_init)
    monkeypatch.setattr(HeadTrainer, "step", spy_step)
    monkeypatch.setattr(EntryHead, "probabilities", spy_probabilities)
    p = Pipeline(Settings(data_dir=tmp_path, speech_model="", ocr=False, clip_model=""))
    await p.start()
    try:
        await p.upsert("kb", [
            EntryData(id="lost", answer="Freeze it in the app.",
                      questions=("I lost my card", "my card is lost", "card lost abroad")),
            EntryData(id="fee", answer="Transfers are free.",
                      questions=("is there a transfer fee", "what fee for a transfer")),
        ])
        for _ in range(200):
            if p.kbs.head_state("kb") == "ready":
                break
            await asyncio.sleep(0.05)
        assert p.kbs.head_state("kb") == "ready"
        assert threads and all(t.startswith("models") for t in threads), threads
        assert p.kbs.state("kb").head.words is not None  # "card", "lost", "fee", "transfer" ...
        # Questions are scored in their encoder batch's job, on the model thread too: numpy
        # there, and no Python of theirs holding the GIL on the event loop.
        async def events(q: str) -> list:
            return [e async for e in p.ask(AskRequest(text=q, knowledge_base="kb"))]

        answers = await asyncio.gather(events("my card got lost"), events("transfer fee?"))
        assert scored and all(t.startswith("models") for t, _ in scored), scored
        assert sorted(q for _, texts in scored for q in texts) == ["my card got lost",
                                                                   "transfer fee?"]
        firsts = [next(e for e in got if isinstance(e, Answer)).entry.id for got in answers]
        assert firsts == ["lost", "fee"]
    finally:
        await p.close()


@pytest.mark.parametrize(("head_weight", "rows"), [(0.5, 100), (0.0, 200)])
async def test_questions_ranked_with_the_head_fetch_fewer_rows(tmp_path, monkeypatch,
                                                              head_weight, rows):
    """With the head ranking too, 100 dense rows score as 200 do (docs/benchmarks/quality.md);
    without it (voice, HEAD_WEIGHT=0, a head still training) the ranking needs the 200."""
    import asyncio

    from supportqa_server.answering import knowledge_bases as heads_module
    from supportqa_server.answering.pipeline import AskRequest, Pipeline
    from supportqa_server.knowledge.store import EntryData, KnowledgeStore
    from supportqa_server.runtime.settings import Settings

    monkeypatch.setattr(heads_module, "HEAD_SETTLE_S", 0.05)
    limits: list[tuple[int, int | None]] = []
    search = KnowledgeStore.search

    def spy_search(self, kb, vectors, texts, *, limit, **kwargs):
        limits.append((limit, kwargs.get("lexical_limit")))
        return search(self, kb, vectors, texts, limit=limit, **kwargs)

    monkeypatch.setattr(KnowledgeStore, "search", spy_search)
    p = Pipeline(Settings(data_dir=tmp_path, speech_model="", ocr=False, clip_model="",
                          head_weight=head_weight))
    await p.start()
    try:
        await p.upsert("kb", [
            EntryData(id="lost", answer="Freeze it in the app.", questions=("I lost my card",)),
            EntryData(id="fee", answer="Transfers are free.", questions=("transfer fee",)),
        ])
        for _ in range(200):
            if head_weight == 0 or p.kbs.head_state("kb") == "ready":
                break
            await asyncio.sleep(0.05)
        [e async for e in p.ask(AskRequest(text="my card got lost", knowledge_base="kb"))]
        assert limits == [(rows, 50)]
    finally:
        await p.close()


def test_a_head_whose_fit_would_not_fit_in_memory_is_off():
    from supportqa_server.answering.knowledge_bases import HEAD_MAX_LOGITS, head_off

    def got(rows: int, entries: int):
        return (1, [f"e{i % entries}" for i in range(rows)], None, None)

    assert head_off(got(10_000, 77), 100_000) is None  # BANKING77-sized: trained
    assert "fewer than 2 entries" in head_off(got(10, 1), 100_000)
    assert "SUPPORTQA_HEAD_MAX_ROWS=100000" in head_off(None, 100_000)
    big = head_off(got(100_000, 10_000), 200_000)  # a help centre of 10,000 entries
    assert big is not None and "100000 rows x 10000 entries" in big and "4.0 GB" in big
    assert 100_000 * 10_000 > HEAD_MAX_LOGITS >= 100_000 * 1_000
