"""A spoken question searched over the beam search's other hypotheses too (SUPPORTQA_SPEECH_NBEST):
a real server and text encoder; Whisper's result is given (the fusion is what is tested, not
what tiny.en hears: test_transcribe.py covers the n-best list itself)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from conftest import SAMPLE_KB
from supportqa.client import AsyncSupportClient
from supportqa.knowledge_file import read_entries

pytestmark = pytest.mark.slow


def noise_wav(seconds: float = 1.0) -> bytes:
    """Quiet noise (about -40 dBFS): audio the server accepts; what Whisper hears is set."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).normal(0, 300, int(16000 * seconds)).astype(np.int16)
    sf.write(buf, noise, 16000, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
async def served(tmp_path_factory):
    from supportqa_server.answering.pipeline import Pipeline
    from supportqa_server.api.server import running_server
    from supportqa_server.runtime.settings import Settings

    settings = Settings(port=0, data_dir=tmp_path_factory.mktemp("nbest"), speech_model="tiny.en",
                        ocr=False, clip_model="", threshold=0.6, speech_nbest=3)
    pipeline = Pipeline(settings)
    async with running_server(settings, pipeline) as target:
        async with AsyncSupportClient(target, timeout=120) as c:
            await c.upsert(read_entries(SAMPLE_KB))
        yield target, pipeline


@pytest.fixture
def heard(served, monkeypatch):
    """Makes Whisper's result for the next spoken questions the one the test sets."""
    from supportqa_server.answering.models import SPEECH
    from supportqa_server.speech.transcribe import Transcription

    models = served[1].models
    real = models.submit
    said: dict = {}

    async def submit(name, item, timeout):
        if name == SPEECH:
            return Transcription(said["text"], "en", 0.01, -0.1, said.get("alternatives", ()))
        return await real(name, item, timeout)

    monkeypatch.setattr(models, "submit", submit)
    return said


async def test_an_other_hypothesis_can_find_the_answer_the_best_missed(served, heard,
                                                                       monkeypatch):
    heard.update(text="I have lost my car keys in the garden",
                 alternatives=(("I have lost my card, I can't find it anywhere", 0.45),
                               ("I have lost my car, can I find it", 0.3)))
    async with AsyncSupportClient(served[0], timeout=120) as c:
        both = await c.ask(audio=noise_wav(), audio_format="wav")
        monkeypatch.setattr(served[1].settings, "speech_nbest", 1)
        best_only = await c.ask(audio=noise_wav(), audio_format="wav")
    assert both.transcript.text == "I have lost my car keys in the garden"  # still the best
    assert both.answers and both.answers[0].entry_id == "card-lost"
    assert not best_only.answers or best_only.answers[0].score < both.answers[0].score


async def test_unlikely_hypotheses_are_not_searched(served, heard, monkeypatch):
    monkeypatch.setattr(served[1].settings, "speech_nbest_min", 0.5)
    heard.update(text="I have lost my car keys in the garden",
                 alternatives=(("I have lost my card, I can't find it anywhere", 0.45),))
    async with AsyncSupportClient(served[0], timeout=120) as c:
        r = await c.ask(audio=noise_wav(), audio_format="wav")
    assert not r.answers or r.answers[0].entry_id != "card-lost" or r.answers[0].score < 0.6
