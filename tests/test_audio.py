"""Audio decoding: every accepted format, resampling, and the errors a caller can act on."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from supportqa_server.errors import InvalidInput, TooLarge
from supportqa_server.speech.audio import (
    FRAME_MS,
    SAMPLE_RATE,
    decode_audio,
    sniff_format,
    speech_end,
    trailing_silence_ms,
)

TONE_HZ = 440.0
SECONDS = 2.0


def tone(rate: int, seconds: float = SECONDS, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    """A sine at TONE_HZ: (n,) mono or (n, channels) with the right channels silent."""
    t = np.arange(int(rate * seconds)) / rate
    x = (amp * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
    if channels == 1:
        return x
    out = np.zeros((x.size, channels), dtype=np.float32)
    out[:, 0] = x
    return out


def encode(x: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.fft.rfftfreq(x.size, 1 / SAMPLE_RATE)[np.argmax(spectrum)])


def check_tone(y: np.ndarray, amp: float = 0.3, tolerance: float = 0.01) -> None:
    assert y.dtype == np.float32 and y.ndim == 1 and y.flags.c_contiguous
    assert abs(y.size - SECONDS * SAMPLE_RATE) <= tolerance * SECONDS * SAMPLE_RATE
    assert np.abs(y).max() <= 1.0
    assert abs(peak_hz(y) - TONE_HZ) < 2.0
    rms = float(np.sqrt(np.mean(y[SAMPLE_RATE // 10 : -SAMPLE_RATE // 10] ** 2)))
    assert rms == pytest.approx(amp / np.sqrt(2), rel=0.1)


@pytest.mark.parametrize(
    ("fmt", "container", "subtype", "rate"),
    [
        ("wav", "WAV", "PCM_16", 16000),
        ("wav", "WAV", "FLOAT", 8000),
        ("flac", "FLAC", "PCM_24", 44100),
        ("ogg", "OGG", "VORBIS", 48000),
        ("ogg", "OGG", "OPUS", 48000),
        ("mp3", "MP3", "MPEG_LAYER_III", 44100),
    ],
)
def test_container_formats_decode_to_16k_mono(fmt, container, subtype, rate):
    if container not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {container}")
    data = encode(tone(rate), rate, container, subtype)
    assert sniff_format(data) == fmt
    for declared in ("", fmt, fmt.upper()):
        check_tone(decode_audio(data, declared))


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_pcm16_resamples_to_the_right_length(rate):
    pcm = (tone(rate) * 32767).astype("<i2").tobytes()
    check_tone(decode_audio(pcm, "pcm16", rate), tolerance=0.001)


def test_stereo_is_averaged_to_mono():
    stereo = tone(44100, channels=2)  # the tone on the left, silence on the right
    check_tone(decode_audio(encode(stereo, 44100, "WAV", "PCM_16")), amp=0.15)
    pcm = (stereo * 32767).astype("<i2").tobytes()  # interleaved L R L R ...
    check_tone(decode_audio(pcm, "pcm16", 44100, channels=2), amp=0.15)


def test_pcm16_channels_zero_means_mono():
    pcm = (tone(16000) * 32767).astype("<i2").tobytes()
    assert np.array_equal(
        decode_audio(pcm, "pcm16", 16000, 0), decode_audio(pcm, "pcm16", 16000, 1)
    )


def test_clipped_float_wav_stays_in_range():
    loud = tone(16000, amp=3.0)
    y = decode_audio(encode(loud, 16000, "WAV", "FLOAT"))
    assert np.abs(y).max() <= 1.0


def raises(exc, match, *args, **kwargs) -> str:
    with pytest.raises(exc, match=match) as info:
        decode_audio(*args, **kwargs)
    return str(info.value)


def test_empty_and_unrecognised_bytes():
    raises(InvalidInput, "audio is empty", b"")
    msg = raises(InvalidInput, "not recognised", b"hello, this is not audio")
    assert "PCM16" in msg and "sample_rate_hz" in msg


def test_corrupt_container_names_the_format():
    wav = encode(tone(16000), 16000, "WAV", "PCM_16")
    msg = raises(InvalidInput, "could not be decoded as WAV", wav[:12] + b"\0" * 64)
    assert "BytesIO" not in msg
    flac = encode(tone(16000), 16000, "FLAC", "PCM_16")
    raises(InvalidInput, "could not be decoded as FLAC", flac[:40] + b"\xff" * 200)


def test_unsupported_and_contradicting_formats():
    wav = encode(tone(16000), 16000, "WAV", "PCM_16")
    raises(InvalidInput, "format 'aac' is not supported", wav, "aac")
    msg = raises(InvalidInput, "declared MP3 but the bytes are WAV", wav, "mp3")
    assert "declare WAV" in msg
    raises(InvalidInput, "declared PCM16 but the bytes are a WAV", wav, "pcm16", 16000)
    raises(InvalidInput, "declared FLAC but has no FLAC signature", b"\x01\x02" * 100, "flac")


def test_sample_rate_out_of_range():
    high = encode(tone(96000), 96000, "WAV", "PCM_16")
    raises(InvalidInput, "96000 Hz is not supported", high)
    low = encode(tone(4000), 4000, "WAV", "PCM_16")
    raises(InvalidInput, "4000 Hz is not supported", low)


def test_bad_pcm16_parameters():
    pcm = (tone(16000) * 32767).astype("<i2").tobytes()
    raises(InvalidInput, "sample_rate_hz between 8000 and 48000, got 0", pcm, "pcm16")
    raises(InvalidInput, "got 96000", pcm, "pcm16", 96000)
    raises(InvalidInput, "channels 1 or 2", pcm, "pcm16", 16000, 3)
    raises(InvalidInput, "multiple of 2 bytes", pcm[:-1], "pcm16", 16000)
    raises(InvalidInput, "multiple of 4 bytes", pcm[:-2], "pcm16", 16000, 2)


def test_silent_and_too_short_audio():
    silent = np.zeros(SAMPLE_RATE * 2, dtype="<i2").tobytes()
    msg = raises(InvalidInput, "silent", silent, "pcm16", 16000)
    assert "microphone" in msg
    raises(InvalidInput, "silent", encode(np.zeros(16000, np.float32), 16000, "FLAC", "PCM_16"))
    raises(
        InvalidInput,
        "too short",
        (tone(16000, 0.05) * 32767).astype("<i2").tobytes(),
        "pcm16",
        16000,
    )


def test_too_long_audio_says_the_limit_and_what_to_do():
    long_wav = encode(tone(16000, seconds=75.2), 16000, "WAV", "PCM_16")
    msg = raises(TooLarge, r"audio is 75\.2 s long; the limit is 60 s", long_wav)
    assert "Converse" in msg
    raises(TooLarge, "limit is 10 s", long_wav, max_seconds=10)
    pcm = (tone(8000, seconds=61) * 32767).astype("<i2").tobytes()
    raises(TooLarge, "61.0 s long", pcm, "pcm16", 8000)
    mp3 = encode(tone(16000, seconds=12), 16000, "MP3", "MPEG_LAYER_III")
    raises(TooLarge, "limit is 10 s", mp3, max_seconds=10)


def speech_then_silence(speech_s: float, silence_s: float, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            np.zeros(SAMPLE_RATE // 2),
            tone(SAMPLE_RATE, speech_s),
            np.zeros(int(SAMPLE_RATE * silence_s)),
        ]
    ).astype(np.float32)
    return x + noise * rng.standard_normal(x.size).astype(np.float32)


@pytest.mark.parametrize("noise", [0.0, 0.003])  # digital silence; -50 dBFS background hiss
def test_trailing_silence_after_speech(noise):
    x = speech_then_silence(1.0, 0.8, noise)
    assert trailing_silence_ms(x) == pytest.approx(800, abs=2 * FRAME_MS)
    assert speech_end(x, silence_ms=700)
    assert not speech_end(x, silence_ms=1000)
    assert not speech_end(speech_then_silence(1.0, 0.3, noise), silence_ms=700)


def test_no_speech_is_no_end_of_utterance():
    rng = np.random.default_rng(0)
    hiss = (0.01 * rng.standard_normal(SAMPLE_RATE * 2)).astype(np.float32)
    assert trailing_silence_ms(hiss) == 0.0  # steady noise: no speech to end
    assert not speech_end(hiss)
    quiet = np.zeros(SAMPLE_RATE * 2, dtype=np.float32)
    assert trailing_silence_ms(quiet) == 2000.0
    assert not speech_end(quiet)  # nothing was said yet
    assert not speech_end(np.zeros(0, dtype=np.float32))
    click = speech_then_silence(0.06, 1.0)  # 60 ms: shorter than min_speech_ms
    assert not speech_end(click, silence_ms=700, min_speech_ms=200)


def test_speech_end_at_other_rates():
    x = speech_then_silence(1.0, 1.0)
    y = np.interp(np.arange(0, x.size, 2), np.arange(x.size), x).astype(np.float32)  # 8 kHz
    assert speech_end(y, sr=8000, silence_ms=700)


def test_raw_samples_accept_what_is_still_arriving():
    from supportqa_server.speech.audio import raw_samples

    def pcm16_samples(data, rate, channels=0):
        return raw_samples(data, "pcm16", rate, channels)

    assert pcm16_samples(b"", 16000).size == 0
    silent = np.zeros(800, dtype="<i2").tobytes()  # 50 ms of silence: too short for decode_audio
    assert pcm16_samples(silent, 16000).size == 800
    pcm = (tone(48000) * 32767).astype("<i2").tobytes()
    check_tone(pcm16_samples(pcm + b"\x01", 48000), tolerance=0.001)  # partial frame dropped
    with pytest.raises(InvalidInput, match="channels 1 or 2"):
        pcm16_samples(pcm, 48000, 3)


@pytest.mark.parametrize("fmt", ["mulaw", "alaw"])
def test_g711_decodes_as_the_standard_library_does(fmt):
    """mu-law and A-law against CPython's own G.711 codec (audioop, deprecated but present
    in 3.11): every one of the 256 codes, and a 440 Hz tone at 8 kHz end to end."""
    import warnings

    from supportqa_server.speech.audio import decode_audio, raw_samples

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    to_lin = audioop.ulaw2lin if fmt == "mulaw" else audioop.alaw2lin
    to_code = audioop.lin2ulaw if fmt == "mulaw" else audioop.lin2alaw
    codes = bytes(range(256))
    want = np.frombuffer(to_lin(codes, 2), dtype="<i2") / 32768.0
    got = raw_samples(codes, fmt, 16000)
    np.testing.assert_allclose(got, want, atol=1e-6)
    t = np.arange(int(SECONDS * 8000)) / 8000
    pcm = (0.3 * np.sin(2 * np.pi * TONE_HZ * t) * 32767).astype("<i2").tobytes()
    heard = decode_audio(to_code(pcm, 2), fmt, 8000, 1)  # resampled to 16 kHz
    check_tone(heard)  # G.711 keeps ~38 dB SNR: the tone's pitch and level survive
    with pytest.raises(InvalidInput, match="8000 on a phone line"):
        decode_audio(to_code(pcm, 2), fmt, 0, 1)
