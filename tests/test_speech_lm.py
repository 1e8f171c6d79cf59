"""Per-knowledge-base speech language models: built once, rebuilt after writes
(at most every LM_REBUILD_S), none when off. A fake recogniser: this is about the cache."""

from __future__ import annotations

import pytest
from supportqa_server.answering import knowledge_bases as kbs_module
from supportqa_server.answering import pipeline as pipeline_module
from supportqa_server.answering.knowledge_bases import KnowledgeBases
from supportqa_server.answering.pipeline import Pipeline
from supportqa_server.runtime.settings import Settings


class FakeStore:
    def __init__(self) -> None:
        self.revisions = {"kb": 0}
        self.reads = 0

    def has(self, kb: str) -> bool:
        return kb in self.revisions

    def revision(self, kb: str) -> int:
        return self.revisions[kb]

    def texts(self, kb: str) -> tuple[int, list[str]]:
        self.reads += 1
        return self.revisions[kb], [f"text {self.revisions[kb]}"]


class FakeLM(tuple):
    @property
    def n_texts(self) -> int:
        return len(self[1])


class FakeSpeech:
    lm_weight = 0.3

    def knowledge_lm(self, texts):
        return FakeLM(("lm", tuple(texts)))


@pytest.fixture
def pipe(tmp_path, monkeypatch):
    kbs = KnowledgeBases(Settings(data_dir=tmp_path), head_on=False, model_exec=None,
                         store_exec=None)
    kbs.store, kbs.speech = FakeStore(), FakeSpeech()
    clock = [1000.0]
    monkeypatch.setattr(kbs_module.time, "monotonic", lambda: clock[0])
    kbs.clock = clock
    return kbs


def test_built_once_per_revision(pipe):
    first = pipe.speech_lm("kb")
    assert first == ("lm", ("text 0",))
    assert pipe.speech_lm("kb") is first
    assert pipe.store.reads == 1


def test_rebuilt_after_a_write_but_not_more_often_than_the_limit(pipe):
    first = pipe.speech_lm("kb")
    pipe.store.revisions["kb"] = 1
    assert pipe.speech_lm("kb") is first  # within LM_REBUILD_S: the slightly stale model
    pipe.clock[0] += kbs_module.LM_REBUILD_S + 1
    assert pipe.speech_lm("kb") == ("lm", ("text 1",))
    assert pipe.store.reads == 2


def test_none_when_off_or_for_an_unknown_knowledge_base(pipe):
    assert pipe.speech_lm("missing") is None
    pipe.speech.lm_weight = 0.0
    assert pipe.speech_lm("kb") is None
    assert pipe.store.reads == 0


async def test_torch_models_run_on_one_thread(tmp_path):
    """Text encoder and Whisper calls of a started pipeline all run on one thread: libgomp
    stops spin-waiting once torch has more OpenMP threads than cores (a second torch thread
    made every model call about 2x slower on 2 cores)."""
    import threading

    from supportqa_server.answering.pipeline import AskRequest, AudioInput
    from supportqa_server.knowledge.store import EntryData
    from supportqa_tools.synth import synthesize_speech

    p = Pipeline(Settings(data_dir=tmp_path, speech_model="tiny.en", ocr=False, clip_model=""))
    await p.start()
    try:
        threads: set[int] = set()

        def spy(fn):
            def run(*args, **kwargs):
                threads.add(threading.get_ident())
                return fn(*args, **kwargs)
            return run

        p.models.encoder.encode_sorted = spy(p.models.encoder.encode_sorted)
        p.models.speech.transcribe_batch = spy(p.models.speech.transcribe_batch)
        await p.upsert("kb", [EntryData(id="pin", title="Reset my PIN", answer="Cards > PIN.")])
        events = [e async for e in p.ask(p.check(
            AskRequest(audio=AudioInput(synthesize_speech("how do I reset my PIN")),
                       knowledge_base="kb"), audio_expected=True))]
        heard = [e.text for e in events if isinstance(e, pipeline_module.Transcript)]
        assert heard and "reset" in heard[0].lower()
        assert len(threads) == 1 and threading.get_ident() not in threads
    finally:
        await p.close()
