"""The caller's turns in a streamed call: the real Silero VAD model on espeak speech, the
raw-audio stream decoder, and a whole call's follow-up turn asked with its context."""

from __future__ import annotations

import io
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import soundfile as sf
import soxr
from supportqa_server.answering.calls import _answer_turn
from supportqa_server.answering.types import AskRequest, Done, NoAnswer, Timings, Transcript
from supportqa_server.speech.audio import RawStream, raw_samples
from supportqa_server.speech.vad import TurnDetector, load_vad


def _speech(text: str) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: `make setup` installs it")
    wav = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True,
                         check=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(samples, rate, 16000).astype(np.float32)


def _line(seconds: float, seed: int = 0) -> np.ndarray:
    """Line noise at about -54 dBFS."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.002, int(16000 * seconds)).astype(np.float32)


def _feed(detector: TurnDetector, audio: np.ndarray, chunk: int = 320) -> list:
    events = []
    for i in range(0, len(audio), chunk):  # 20 ms chunks, as a gateway sends them
        events += detector.feed(audio[i : i + chunk])
    return events


def test_three_questions_make_three_turns():
    said = ["I have lost my card", "how do I reset my pin", "and how long does that take"]
    parts = []
    for i, text in enumerate(said):
        parts += [_line(0.5, i), _speech(text)]
    audio = np.concatenate([*parts, _line(1.0, 9)])
    events = _feed(TurnDetector(load_vad(), end_silence_ms=600, max_turn_s=30), audio)
    assert [e.kind for e in events] == ["start", "end"] * 3
    starts = [e.at_ms for e in events if e.kind == "start"]
    # each turn starts within 0.2 s after its speech does
    onset = 0.0  # ms
    for gap, spoken, start in zip(parts[::2], parts[1::2], starts, strict=True):
        onset += len(gap) / 16
        assert onset - 100 <= start <= onset + 200
        onset += len(spoken) / 16
    for e, text in zip([e for e in events if e.kind == "end"], said, strict=True):
        spoken_s = len(_speech(text)) / 16000
        assert spoken_s <= len(e.audio) / 16000 <= spoken_s + 1.2  # pre-roll + end silence


def test_clicks_and_line_noise_start_no_turn():
    audio = _line(2.0)
    audio[16000:16000 + 800] += np.random.default_rng(1).normal(0, 0.3, 800)  # a 50 ms click
    assert _feed(TurnDetector(load_vad(), end_silence_ms=600, max_turn_s=30), audio) == []


def test_hanging_up_mid_turn_ends_it_and_long_turns_are_cut():
    detector = TurnDetector(load_vad(), end_silence_ms=600, max_turn_s=30)
    speech = _speech("I would like to know about my card")
    events = _feed(detector, speech[: len(speech) // 2])
    assert [e.kind for e in events] == ["start"] and detector.in_turn
    end = detector.flush()
    assert end is not None and end.kind == "end" and len(end.audio) > 0
    assert not detector.in_turn and detector.flush() is None
    short = TurnDetector(load_vad(), end_silence_ms=600, max_turn_s=0.5)
    kinds = [e.kind for e in _feed(short, speech)]
    assert kinds[:2] == ["start", "end"]  # cut at half a second


def test_raw_stream_decodes_chunks_as_the_whole_buffer_decodes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    speech8k = soxr.resample(_speech("my card was declined"), 16000, 8000)
    ulaw = audioop.lin2ulaw((np.clip(speech8k, -1, 1) * 32767).astype("<i2").tobytes(), 2)
    stream = RawStream("mulaw", 8000)
    got = np.concatenate([stream.feed(ulaw[i : i + 157]) for i in range(0, len(ulaw), 157)])
    whole = raw_samples(ulaw, "mulaw", 8000)
    n = min(len(got), len(whole)) - 400  # the streaming resampler holds back its tail
    assert n > 0.9 * len(whole)
    delay = int(np.argmax(np.correlate(got[:4000], whole[:2000], "valid")))
    assert np.corrcoef(got[delay:delay + n - 400], whole[: n - 400])[0, 1] > 0.99


class _FakePipeline:
    """Answers a transcript of "how long does that take" only with context."""

    async def answer_accepted(self, req: AskRequest, utterance, timings: Timings, t_start):
        if utterance is not None:
            yield Transcript("how long does that take", "en", True)
            yield NoAnswer("no confident answer", 0.2, 0.5)
        elif "refund" in req.text:
            from supportqa_server.answering.types import Answer
            from supportqa_server.knowledge.entries import EntryData

            yield Answer(1, EntryData(id="refund-time", answer="5 days"), 0.8, ("dense",), "")
        else:
            yield NoAnswer("no confident answer", 0.1, 0.5)
        yield Done(timings)


async def _turn(context: str) -> list:
    return [ev async for ev in _answer_turn(_FakePipeline(), AskRequest(), np.zeros(16000),
                                           2, context, 0.0)]


async def test_a_follow_up_turn_is_asked_with_the_previous_question():
    events = await _turn("how do I get a refund")
    assert [type(e).__name__ for e in events] == ["Transcript", "Answer", "Done"]
    assert events[1].entry.id == "refund-time" and events[-1].turn == 2


async def test_without_context_the_no_answer_stands():
    events = await _turn("")
    assert [type(e).__name__ for e in events] == ["Transcript", "NoAnswer", "Done"]
    unrelated = await _turn("what is the weather")
    assert isinstance(unrelated[1], NoAnswer)


def test_a_transcript_is_doubted_when_whisper_was_unsure_or_heard_no_speech():
    from supportqa_server.speech.transcribe import Transcription

    sure = Transcription("I lost my card", "en", no_speech_prob=0.01, avg_logprob=-0.2)
    assert sure.confidence == pytest.approx(np.exp(-0.2))
    assert sure.doubt(0.4) is None
    unsure = Transcription("eye lost mike art", "en", no_speech_prob=0.1, avg_logprob=-1.5)
    assert "confidence 0.22 is below 0.40" in unsure.doubt(0.4)
    assert unsure.doubt(0.2) is None
    # tiny.en's "you" on a tone: no speech, and not sure enough to outweigh that
    silence = Transcription("you", "en", no_speech_prob=0.9, avg_logprob=np.log(0.6))
    assert "no speech" in silence.doubt(0.0)
    loud_and_clear = Transcription("press one", "en", no_speech_prob=0.9, avg_logprob=-0.1)
    assert loud_and_clear.doubt(0.5) is None
    assert "nothing was recognised" in Transcription("", "en").doubt(0.4)
    assert Transcription("text", "en").doubt(0.4) is None  # confidence unknown: no doubt
