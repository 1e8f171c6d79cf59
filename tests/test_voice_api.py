"""Voice questions end to end: real server, real tiny.en converted from the bundled weights."""

from __future__ import annotations

import asyncio
import io
import shutil

import grpc
import numpy as np
import pytest
import soundfile as sf
from conftest import SAMPLE_KB
from supportqa.client import AsyncSupportClient, SupportQAError
from supportqa.knowledge_file import read_entries
from supportqa.v1 import supportqa_pb2 as pb

pytestmark = pytest.mark.slow

SPOKEN = [
    ("I have lost my card and I can't find it anywhere", "card-lost"),
    ("How do I close my account for good", "account-close"),
]


def speak(text: str) -> bytes:
    from supportqa_tools.synth import synthesize_speech

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: `make setup` installs it")
    return synthesize_speech(text)


def pcm16(wav: bytes) -> tuple[bytes, int]:
    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    return samples.tobytes(), rate


@pytest.fixture(scope="module")
async def voice_server(tmp_path_factory):
    from supportqa_server.api.server import running_server
    from supportqa_server.runtime.settings import Settings

    # Small stream budgets, so the tests below can spend them: 2 MiB per stream (PCM16 of 30 s
    # at 16 kHz is 0.96 MB), 5 MiB for all streams together, 5 s of silence ends a stream.
    settings = Settings(port=0, data_dir=tmp_path_factory.mktemp("voice"), speech_model="tiny.en",
                        ocr=False, clip_model="", max_audio_seconds=30, stream_idle_seconds=5,
                        max_stream_audio_bytes=2 * 2**20, max_buffered_audio_bytes=5 * 2**20)
    async with running_server(settings) as target:
        async with AsyncSupportClient(target, timeout=120) as c:
            await c.upsert(read_entries(SAMPLE_KB))
        yield target


@pytest.fixture
async def vclient(voice_server):
    async with AsyncSupportClient(voice_server, timeout=120, retries=0) as c:
        yield c


@pytest.mark.parametrize(("text", "entry_id"), SPOKEN)
async def test_spoken_question_gets_the_right_entry(vclient, text, entry_id):
    r = await vclient.ask(audio=speak(text), audio_format="wav")
    assert r.transcript.final and r.transcript.language == "en"
    words = set(r.transcript.text.lower().replace(",", "").replace(".", "").split())
    assert {"card", "account"} & words
    assert r.answers[0].entry_id == entry_id, (r.transcript.text, [a.entry_id for a in r.answers])
    assert r.timings.transcribe_us > 0 and r.timings.decode_us > 0


async def test_real_human_speech(vclient, shared_data):
    data = (shared_data / "speech" / "jfk" / "jfk.flac").read_bytes()
    events = [ev async for ev in vclient.ask_stream(audio=data, min_score=0.0)]
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["Accepted", "Transcript"] and kinds[-1] == "Done"
    assert "my fellow americans" in events[1].text.lower()
    assert "your country" in events[1].text.lower()


async def test_converse_in_chunks_matches_one_shot(vclient):
    wav = speak("My card has been stolen, what should I do")
    one_shot = await vclient.ask(audio=wav, audio_format="wav")
    raw, rate = pcm16(wav)
    chunk = rate * 2 // 5  # 200 ms of 16-bit mono per message

    def requests():
        cfg = pb.ConverseConfig(question=pb.Question(top_k=5), format=pb.AUDIO_FORMAT_PCM16,
                                sample_rate_hz=rate, channels=1)
        yield pb.ConverseRequest(config=cfg)
        for i in range(0, len(raw), chunk):
            yield pb.ConverseRequest(audio_chunk=raw[i : i + chunk])
        yield pb.ConverseRequest(end=pb.EndOfUtterance())

    events = [ev async for ev in vclient.converse(requests())]
    finals = [e for e in events if isinstance(e, pb.Transcript) and e.final]
    assert len(finals) == 1
    assert finals[0].text == one_shot.transcript.text
    answers = [e.entry_id for e in events if isinstance(e, pb.Answer)]
    assert answers == [a.entry_id for a in one_shot.answers]
    assert answers[0] == "card-stolen"
    assert isinstance(events[0], pb.Accepted) and isinstance(events[-1], pb.Done)


async def test_converse_ends_on_trailing_silence(vclient):
    raw, rate = pcm16(speak("I want to close my account"))
    silence = bytes(2 * rate)  # 1 s of digital silence

    async def requests():
        cfg = pb.ConverseConfig(question=pb.Question(), format=pb.AUDIO_FORMAT_PCM16,
                                sample_rate_hz=rate, end_silence_ms=600)
        yield pb.ConverseRequest(config=cfg)
        yield pb.ConverseRequest(audio_chunk=raw)
        yield pb.ConverseRequest(audio_chunk=silence)
        # No EndOfUtterance and the stream stays open: the server must end the utterance.
        await asyncio.sleep(60)

    events = []
    async for ev in vclient.converse(requests(), timeout=60):
        events.append(ev)
    finals = [e.text for e in events if isinstance(e, pb.Transcript) and e.final]
    assert len(finals) == 1 and "close" in finals[0].lower(), events
    assert isinstance(events[-1], pb.Done)


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"audio": b"this is not audio at all" * 10, "audio_format": "wav"}, "audio"),
        ({"audio": b"\x00\x01" * 100}, "format"),
        ({"audio": _wav(np.zeros(16000, dtype=np.float32)), "audio_format": "wav"}, "silent"),
        ({"audio": _wav(0.1 * np.sin(np.arange(16000 * 31) / 5.0)), "audio_format": "wav"},
         "limit"),
        ({"audio": b"\x00\x00" * 1600, "audio_format": "pcm16"}, "sample"),
    ],
)
async def test_bad_audio_is_invalid_argument(vclient, kwargs, words):
    with pytest.raises(SupportQAError) as e:
        await vclient.ask(**kwargs)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in e.value.details.lower()
    ok = await vclient.ask("is the server still fine")  # nothing crashed
    assert ok.request_id


async def test_converse_sends_partial_transcripts_while_caller_speaks(vclient):
    raw, rate = pcm16(speak(
        "Hello, I sent money to my friend on Monday and it still has not arrived in her account"
    ))
    chunk = rate * 2 // 5  # 200 ms

    async def requests():
        cfg = pb.ConverseConfig(question=pb.Question(), format=pb.AUDIO_FORMAT_PCM16,
                                sample_rate_hz=rate)
        yield pb.ConverseRequest(config=cfg)
        for i in range(0, len(raw), chunk):
            yield pb.ConverseRequest(audio_chunk=raw[i : i + chunk])
            await asyncio.sleep(0.2)  # as fast as the caller speaks
        yield pb.ConverseRequest(end=pb.EndOfUtterance())

    events = [ev async for ev in vclient.converse(requests())]
    transcripts = [e for e in events if isinstance(e, pb.Transcript)]
    partial = [t for t in transcripts if not t.final]
    assert partial, "no partial transcript while audio was arriving"
    assert transcripts[-1].final
    assert len(partial[0].text) < len(transcripts[-1].text)


async def test_converse_starting_with_silence_is_fine(vclient):
    raw, rate = pcm16(speak("How do I close my account for good"))
    chunk = rate * 2 // 20  # 50 ms: shorter than the 0.1 s a whole question needs

    def requests():
        cfg = pb.ConverseConfig(question=pb.Question(), format=pb.AUDIO_FORMAT_PCM16,
                                sample_rate_hz=rate, end_silence_ms=700)
        yield pb.ConverseRequest(config=cfg)
        for _ in range(10):  # half a second of the caller saying nothing
            yield pb.ConverseRequest(audio_chunk=bytes(chunk))
        for i in range(0, len(raw), chunk):
            yield pb.ConverseRequest(audio_chunk=raw[i : i + chunk])
        yield pb.ConverseRequest(end=pb.EndOfUtterance())

    events = [ev async for ev in vclient.converse(requests())]
    answers = [e.entry_id for e in events if isinstance(e, pb.Answer)]
    assert answers and answers[0] == "account-close"


async def test_an_idle_converse_is_closed_by_the_server(vclient):
    """A caller that opens a stream and goes quiet holds it no longer than
    SUPPORTQA_STREAM_IDLE_SECONDS (5 s here): the server ends it with a status that says so."""
    held = asyncio.Event()

    async def requests():
        yield pb.ConverseRequest(config=pb.ConverseConfig(
            question=pb.Question(), format=pb.AUDIO_FORMAT_PCM16, sample_rate_hz=16000))
        yield pb.ConverseRequest(audio_chunk=bytes(3200))
        await held.wait()  # never set: the caller says nothing more

    with pytest.raises(SupportQAError) as e:
        async for _ in vclient.converse(requests(), timeout=60):
            pass
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "sent nothing for 5 s" in e.value.details


async def test_streamed_audio_has_a_budget_per_stream_and_for_all_streams(vclient, voice_server):
    """A stream declared WAV cannot buffer past its 2 MiB; three open streams of 1.8 MiB each
    pass the 5 MiB all streams share, and the one that would is refused with
    RESOURCE_EXHAUSTED while the others go on."""
    mib = 2**20

    async def sending(total: int, hold: asyncio.Event | None = None, sent=None):
        yield pb.ConverseRequest(config=pb.ConverseConfig(
            question=pb.Question(), format=pb.AUDIO_FORMAT_WAV))
        for _ in range(total // (256 * 1024)):
            yield pb.ConverseRequest(audio_chunk=bytes(256 * 1024))
        if sent is not None:
            sent.set()
        if hold is not None:
            await hold.wait()
        yield pb.ConverseRequest(end=pb.EndOfUtterance())

    async def outcome(requests) -> grpc.StatusCode:
        try:
            async for _ in vclient.converse(requests, timeout=60):
                pass
        except SupportQAError as e:
            return e.code, e.details
        return grpc.StatusCode.OK, ""

    code, details = await outcome(sending(3 * mib))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "2 MiB" in details

    hold = asyncio.Event()
    sent = [asyncio.Event(), asyncio.Event()]
    first_two = [asyncio.create_task(outcome(sending(int(1.8 * mib), hold, ev))) for ev in sent]
    for ev in sent:
        await asyncio.wait_for(ev.wait(), 30)
    await asyncio.sleep(0.5)  # the server has taken the last chunks
    code, details = await outcome(sending(int(1.8 * mib)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "SUPPORTQA_MAX_BUFFERED_AUDIO_BYTES" in details
    hold.set()
    # The held streams were all zeros: not audio, refused when decoded, not for the budget.
    for code, details in await asyncio.gather(*first_two):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details


async def test_a_phone_line_in_mulaw_at_8khz_is_answered(vclient):
    """G.711 mu-law at 8 kHz in 20 ms frames, as a telephony gateway streams a call, with a
    second of line silence (mu-law 0xFF) after the caller: partial transcripts, the end found
    on silence, the right answer."""
    import warnings

    import soxr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # the encoder the gateway stands in for
    samples, rate = sf.read(io.BytesIO(speak("I have lost my card and I can't find it")),
                            dtype="float32")
    phone = soxr.resample(samples, rate, 8000)
    ulaw = audioop.lin2ulaw((np.clip(phone, -1, 1) * 32767).astype("<i2").tobytes(), 2)
    ulaw += b"\xff" * 8000  # mu-law's zero is 0xFF
    frames = [ulaw[i : i + 160] for i in range(0, len(ulaw), 160)]  # 20 ms each

    async def requests():
        cfg = pb.ConverseConfig(question=pb.Question(), format=pb.AUDIO_FORMAT_MULAW,
                                sample_rate_hz=8000, end_silence_ms=600)
        yield pb.ConverseRequest(config=cfg)
        for frame in frames:
            yield pb.ConverseRequest(audio_chunk=frame)
        await asyncio.sleep(60)

    events = [ev async for ev in vclient.converse(requests(), timeout=60)]
    finals = [e.text for e in events if isinstance(e, pb.Transcript) and e.final]
    assert len(finals) == 1 and "card" in finals[0].lower(), events
    answers = [e for e in events if isinstance(e, pb.Answer)]
    assert answers and answers[0].entry_id == "card-lost", events
    one_shot = await vclient.ask(audio=ulaw, audio_format="mulaw", sample_rate_hz=8000)
    assert one_shot.answers[0].entry_id == "card-lost"


def _mulaw_call(questions: list[str], gap_s: float = 1.0) -> list[bytes]:
    """A phone call: each question spoken, resampled to 8 kHz, then gap_s of line silence,
    all as G.711 mu-law in 20 ms frames, as a telephony gateway streams it."""
    import warnings

    import soxr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # the encoder the gateway stands in for
    ulaw = b""
    for q in questions:
        samples, rate = sf.read(io.BytesIO(speak(q)), dtype="float32")
        phone = soxr.resample(samples, rate, 8000)
        ulaw += audioop.lin2ulaw((np.clip(phone, -1, 1) * 32767).astype("<i2").tobytes(), 2)
        ulaw += b"\xff" * int(8000 * gap_s)  # mu-law's zero is 0xFF
    return [ulaw[i : i + 160] for i in range(0, len(ulaw), 160)]


async def test_a_whole_call_answers_every_turn_without_end_of_utterance(vclient):
    """Three questions in one mu-law Converse stream, found by the VAD: per turn
    SpeechStarted, Accepted, the final transcript, an answer and Done(turn)."""
    asked = [("I have lost my card and I can't find it", "card-lost"),
             ("How do I close my account for good", "account-close"),
             ("Someone stole my debit card", "card-stolen")]
    frames = _mulaw_call([q for q, _ in asked])

    async def requests():
        cfg = pb.ConverseConfig(question=pb.Question(), format=pb.AUDIO_FORMAT_MULAW,
                                sample_rate_hz=8000, whole_call=True)
        yield pb.ConverseRequest(config=cfg)
        for frame in frames:
            yield pb.ConverseRequest(audio_chunk=frame)
            await asyncio.sleep(0.005)  # 4x faster than the line: a call arrives over time

    events = [ev async for ev in vclient.converse(requests(), timeout=120)]
    started = [e for e in events if isinstance(e, pb.SpeechStarted)]
    assert [e.turn for e in started] == [0, 1, 2], events
    assert started[0].at_ms < started[1].at_ms < started[2].at_ms
    finals = [e.text.lower() for e in events if isinstance(e, pb.Transcript) and e.final]
    assert len(finals) == 3 and "card" in finals[0] and "account" in finals[1], finals
    assert [e.turn for e in events if isinstance(e, pb.Done)] == [0, 1, 2]
    assert len({e.request_id for e in events if isinstance(e, pb.Accepted)}) == 3
    # each turn's events lie between its SpeechStarted and its Done
    turns, current = [], None
    for e in events:
        if isinstance(e, pb.SpeechStarted):
            current = []
        elif isinstance(e, pb.Done):
            turns.append(current)
        elif isinstance(e, pb.Answer) and e.rank == 1:
            current.append(e.entry_id)
    assert [t[:1] for t in turns] == [[entry] for _, entry in asked], turns


async def test_a_whole_call_needs_raw_audio(vclient):
    async def requests():
        yield pb.ConverseRequest(config=pb.ConverseConfig(
            question=pb.Question(), format=pb.AUDIO_FORMAT_WAV, whole_call=True))
        yield pb.ConverseRequest(audio_chunk=b"RIFF")

    with pytest.raises(SupportQAError) as e:
        [ev async for ev in vclient.converse(requests(), timeout=30)]
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw audio" in e.value.details


async def test_noise_is_not_heard_and_gets_no_answer(vclient):
    """Line noise is no question: NotHeard asks the caller to repeat, and no entry is
    offered for whatever tiny.en made of it."""
    noise = np.random.default_rng(0).normal(0, 0.1, 32000).astype(np.float32)
    result = await vclient.ask(audio=_wav(noise), audio_format="wav")
    assert result.HasField("not_heard"), result
    assert "please repeat" in result.not_heard.reason
    assert not result.answers and not result.HasField("no_answer")
    assert 0 <= result.transcript.confidence < 1
    spoken = await vclient.ask(audio=speak(SPOKEN[0][0]), audio_format="wav")
    assert not spoken.HasField("not_heard")
    assert spoken.transcript.confidence > 0.5
