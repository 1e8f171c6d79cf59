"""Decodes spoken questions into 16 kHz mono float32 samples and finds trailing silence."""

from __future__ import annotations

import io
import math

import numpy as np
import soundfile as sf
import soxr

from supportqa_server.errors import InvalidInput, TooLarge

SAMPLE_RATE = 16000  # Hz, what Whisper expects
MIN_RATE, MAX_RATE = 8000, 48000  # Hz, accepted input sample rates
MIN_SECONDS = 0.1  # shorter utterances hold no word; rejected as empty
SILENCE_RMS_DBFS = -70.0  # whole-utterance RMS below this is a muted mic (~10 LSB of 16-bit PCM)
FORMATS = ("", "wav", "flac", "ogg", "mp3", "pcm16", "mulaw", "alaw")
# Raw formats (no header: the caller says the rate and channels) and their bytes per sample.
RAW_BYTES = {"pcm16": 2, "mulaw": 1, "alaw": 1}


def _g711_tables() -> dict[str, np.ndarray]:
    """G.711 (ITU-T, 1972) code -> linear sample in [-1, 1], for mu-law and A-law: 256
    entries each, from the standard's segment/mantissa formulas."""
    codes = np.arange(256, dtype=np.int32)
    u = ~codes & 0xFF  # mu-law codes are sent inverted
    exp, mant = (u >> 4) & 0x07, u & 0x0F
    mu = (((mant << 3) + 0x84) << exp) - 0x84  # 14-bit magnitude, bias 132
    mu = np.where(u & 0x80, -mu, mu) / 32768.0
    a = codes ^ 0x55  # A-law codes have their even bits inverted
    exp, mant = (a >> 4) & 0x07, a & 0x0F
    mag = np.where(exp == 0, (mant << 4) + 8, ((mant << 4) + 0x108) << np.maximum(exp - 1, 0))
    alaw = np.where(a & 0x80, mag, -mag) / 32768.0
    return {"mulaw": mu.astype(np.float32), "alaw": alaw.astype(np.float32)}


_G711 = _g711_tables()

FRAME_MS = 20  # energy frames of trailing-silence detection
NOISE_PERCENTILE = 10  # the quietest 10% of frames estimate the background noise
SPEECH_PERCENTILE = 95  # the loudest 5% of frames estimate the speech level
SPEECH_OVER_NOISE_DB = 10.0  # a frame this far above the noise floor is speech
MIN_CONTRAST_DB = 15.0  # speech must stand this far above the noise to be heard at all
ABSOLUTE_SILENCE_DBFS = -60.0  # frames below this are silence whatever the noise floor
_FLOOR_DBFS = -120.0  # stands in for log(0)


def sniff_format(data: bytes) -> str:
    """Names the container of ``data`` from its magic bytes.

    Returns:
        "wav", "flac", "ogg" or "mp3"; "" when nothing matches (raw PCM has no signature).
    """
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:3] == b"ID3":
        return "mp3"
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and data[1] & 0x06:
        return "mp3"  # MPEG audio frame sync (11 set bits), layer bits not 00 (that is AAC)
    return ""


def _dbfs(rms: np.ndarray | float) -> np.ndarray:
    return 20.0 * np.log10(np.maximum(rms, 10 ** (_FLOOR_DBFS / 20)))


def _decode_raw(data: bytes, fmt: str, sample_rate_hz: int, channels: int
                ) -> tuple[np.ndarray, int]:
    """Raw samples (RAW_BYTES formats) as float32 (n, channels)."""
    name = fmt.upper()
    if not MIN_RATE <= sample_rate_hz <= MAX_RATE:
        raise InvalidInput(
            f"{name} audio needs sample_rate_hz between {MIN_RATE} and {MAX_RATE}, "
            f"got {sample_rate_hz}: set it to the rate the samples were recorded at"
            + (" (8000 on a phone line)" if fmt != "pcm16" else "")
        )
    channels = channels or 1
    if channels not in (1, 2):
        raise InvalidInput(f"{name} audio needs channels 1 or 2 (0 means 1), got {channels}")
    frame_bytes = RAW_BYTES[fmt] * channels
    if len(data) % frame_bytes:
        raise InvalidInput(
            f"{name} audio with {channels} channel(s) must be a multiple of {frame_bytes} "
            f"bytes, got {len(data)}: send whole sample frames"
        )
    if fmt == "pcm16":
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    else:
        samples = _G711[fmt][np.frombuffer(data, dtype=np.uint8)]
    return samples.reshape(-1, channels), sample_rate_hz


def _decode_container(data: bytes, fmt: str, max_seconds: float) -> tuple[np.ndarray, int]:
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            # MP3 and some OGG report an estimated frame count; the length is re-checked below.
            if f.frames > 0 and f.frames / rate > max_seconds + 1.0:
                _too_long(f.frames / rate, max_seconds)
            if not MIN_RATE <= rate <= MAX_RATE:
                raise InvalidInput(
                    f"{fmt.upper()} audio at {rate} Hz is not supported: send "
                    f"{MIN_RATE}..{MAX_RATE} Hz (16000 Hz is what the recogniser uses)"
                )
            limit = int(rate * (max_seconds + 1.0))  # never decode much past the limit
            samples = f.read(frames=limit + 1, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as e:
        reason = getattr(e, "error_string", None) or str(e)  # libsndfile's text, sans file repr
        raise InvalidInput(
            f"audio could not be decoded as {fmt.upper()} ({reason}): send WAV, FLAC, OGG "
            f"(Vorbis/Opus), MP3, or PCM16 with sample_rate_hz and channels"
        ) from e
    return samples, rate


def _too_long(seconds: float, max_seconds: float) -> None:
    raise TooLarge(
        f"audio is {seconds:.1f} s long; the limit is {max_seconds:g} s: "
        f"send a shorter utterance or stream it with Converse"
    )


def decode_audio(
    data: bytes,
    fmt: str = "",
    sample_rate_hz: int = 0,
    channels: int = 0,
    *,
    max_seconds: float = 60.0,
) -> np.ndarray:
    """Decodes audio bytes into what the recogniser takes.

    Decoding runs in-process with the libsndfile bundled in soundfile (WAV, FLAC, OGG
    Vorbis/Opus, MP3); no ffmpeg. Stereo is averaged to mono; 8..48 kHz is resampled to
    16 kHz with soxr.

    Args:
        data: the encoded audio.
        fmt: "wav", "flac", "ogg", "mp3", "pcm16", or "" to sniff from the magic bytes.
        sample_rate_hz: PCM16 sample rate, 8000..48000; ignored for other formats.
        channels: PCM16 interleaved channels, 1 or 2 (0 means 1); ignored for other formats.
        max_seconds: the longest utterance accepted.

    Returns:
        float32 samples in [-1, 1], mono, 16 kHz, shape (n,).

    Raises:
        InvalidInput: empty, silent (RMS below SILENCE_RMS_DBFS), undecodable, of an
            unsupported or contradicting format, or PCM16 without valid parameters.
        TooLarge: longer than max_seconds.
    """
    fmt = (fmt or "").lower()
    if fmt not in FORMATS:
        raise InvalidInput(
            f"audio format {fmt!r} is not supported: use one of wav, flac, ogg, mp3, pcm16, "
            f"mulaw, alaw, or leave it empty to detect"
        )
    if not data:
        raise InvalidInput("audio is empty: send the recorded bytes")
    sniffed = sniff_format(data)
    if fmt in RAW_BYTES:
        if sniffed in ("wav", "flac", "ogg"):
            raise InvalidInput(
                f"audio is declared {fmt.upper()} but the bytes are a {sniffed.upper()} file: "
                f"declare {sniffed.upper()} or leave the format unspecified"
            )
        samples, rate = _decode_raw(data, fmt, sample_rate_hz, channels)
    else:
        if not sniffed and fmt:
            raise InvalidInput(
                f"audio is declared {fmt.upper()} but has no {fmt.upper()} signature: check "
                f"the encoding, or declare PCM16 with sample_rate_hz and channels for raw samples"
            )
        if not sniffed:
            raise InvalidInput(
                "audio format not recognised (no WAV, FLAC, OGG or MP3 signature): for raw "
                "samples declare PCM16 with sample_rate_hz and channels"
            )
        if fmt and fmt != sniffed:
            raise InvalidInput(
                f"audio is declared {fmt.upper()} but the bytes are {sniffed.upper()}: "
                f"declare {sniffed.upper()} or leave the format unspecified"
            )
        samples, rate = _decode_container(data, sniffed, max_seconds)

    seconds = samples.shape[0] / rate
    if seconds > max_seconds:
        _too_long(seconds, max_seconds)
    if seconds < MIN_SECONDS:
        raise InvalidInput(
            f"audio is {seconds:.2f} s long, too short to hold speech: send at least "
            f"{MIN_SECONDS:g} s"
        )
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    mono = np.clip(np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    level = float(_dbfs(math.sqrt(float(np.mean(np.square(mono, dtype=np.float64))))))
    if level < SILENCE_RMS_DBFS:
        raise InvalidInput(
            f"audio is silent (RMS {level:.0f} dBFS, below {SILENCE_RMS_DBFS:g} dBFS): "
            f"check that the microphone is not muted"
        )
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(np.clip(mono, -1.0, 1.0), dtype=np.float32)


def raw_samples(data: bytes, fmt: str, sample_rate_hz: int, channels: int = 0) -> np.ndarray:
    """Converts raw samples (PCM16, mu-law, A-law) to 16 kHz mono float32 without judging
    the content.

    For audio still arriving (Converse): unlike decode_audio, an empty, short or silent
    buffer is not an error, so trailing-silence detection can run from the first chunk.

    Args:
        data: interleaved samples of a RAW_BYTES format; a trailing partial frame is ignored.
        fmt: "pcm16", "mulaw" or "alaw".
        sample_rate_hz: 8000..48000.
        channels: 1 or 2 (0 means 1).

    Returns:
        float32 samples in [-1, 1], shape (n,).

    Raises:
        InvalidInput: sample_rate_hz or channels out of range.
    """
    frame_bytes = RAW_BYTES[fmt] * (channels or 1)
    whole = data[: len(data) - len(data) % frame_bytes]
    samples, rate = _decode_raw(whole, fmt, sample_rate_hz, channels)
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate != SAMPLE_RATE and mono.size:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def frame_levels(samples: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Returns the RMS level in dBFS of each whole FRAME_MS frame, shape (n_frames,)."""
    hop = sr * FRAME_MS // 1000  # samples per frame: 320 at 16 kHz
    n = len(samples) // hop
    if n == 0:
        return np.empty(0, dtype=np.float64)
    frames = np.asarray(samples[: n * hop], dtype=np.float64).reshape(n, hop)
    return _dbfs(np.sqrt(np.mean(np.square(frames), axis=1)))


def _speech_threshold(levels: np.ndarray) -> float | None:
    """dBFS above which a frame counts as speech; None when no speech stands out."""
    noise = float(np.percentile(levels, NOISE_PERCENTILE))
    speech = float(np.percentile(levels, SPEECH_PERCENTILE))
    if speech < ABSOLUTE_SILENCE_DBFS or speech - noise < MIN_CONTRAST_DB:
        return None
    return max(noise + SPEECH_OVER_NOISE_DB, ABSOLUTE_SILENCE_DBFS)


def trailing_silence_ms(samples: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    """Measures how long the audio has been quiet at its end.

    Frames of FRAME_MS are compared with an adaptive threshold: SPEECH_OVER_NOISE_DB above
    the noise floor (the NOISE_PERCENTILE-th frame level) and never below
    ABSOLUTE_SILENCE_DBFS. The threshold needs speech standing MIN_CONTRAST_DB over the noise;
    without it the whole utterance counts as silence if quiet (loudest frames under
    ABSOLUTE_SILENCE_DBFS), else as no silence (steady noise or speech with no pause).

    Pass the whole utterance so far (the noise estimate needs its pauses); it costs about
    1 ms per 10 s of 16 kHz audio.

    Args:
        samples: mono float samples in [-1, 1].
        sr: their sample rate in Hz.

    Returns:
        Milliseconds of trailing silence, a multiple of FRAME_MS.
    """
    levels = frame_levels(samples, sr)
    if levels.size == 0:
        return 0.0
    threshold = _speech_threshold(levels)
    if threshold is None:
        quiet = float(np.max(levels)) < ABSOLUTE_SILENCE_DBFS
        return float(levels.size * FRAME_MS) if quiet else 0.0
    loud = np.flatnonzero(levels >= threshold)
    return float((levels.size - 1 - loud[-1]) * FRAME_MS)


def speech_end(
    samples: np.ndarray,
    sr: int = SAMPLE_RATE,
    silence_ms: float = 700.0,
    min_speech_ms: float = 200.0,
) -> bool:
    """Tells whether an utterance has ended: speech was heard, then silence_ms of quiet.

    Used by the streaming Converse RPC for end-of-utterance detection; see
    trailing_silence_ms for how silence is told from speech.

    Args:
        samples: mono float samples in [-1, 1], the utterance so far.
        sr: their sample rate in Hz.
        silence_ms: trailing quiet that ends the utterance; 500-1000 ms suits questions.
        min_speech_ms: speech frames needed before it, so a click or a cough ends nothing.

    Returns:
        True once the utterance has ended.
    """
    levels = frame_levels(samples, sr)
    if levels.size == 0:
        return False
    threshold = _speech_threshold(levels)
    if threshold is None:
        return False
    loud = levels >= threshold
    last = int(np.flatnonzero(loud)[-1])
    trailing = (levels.size - 1 - last) * FRAME_MS
    return trailing >= silence_ms and int(loud.sum()) * FRAME_MS >= min_speech_ms


class RawStream:
    """A call's raw audio (a RAW_BYTES format) as it arrives, to 16 kHz mono float32:
    partial sample frames wait for their rest, and one streaming resampler carries across
    chunks (resampling each 20 ms chunk alone would click at every chunk's edges)."""

    def __init__(self, fmt: str, sample_rate_hz: int, channels: int = 0) -> None:
        _decode_raw(b"", fmt, sample_rate_hz, channels)  # InvalidInput for a bad rate/layout
        self.fmt, self.rate, self.channels = fmt, sample_rate_hz, channels or 1
        self._frame = RAW_BYTES[fmt] * self.channels  # bytes per sample frame
        self._rest = b""
        self._resampler = (soxr.ResampleStream(sample_rate_hz, SAMPLE_RATE, 1, "float32")
                           if sample_rate_hz != SAMPLE_RATE else None)

    def feed(self, data: bytes) -> np.ndarray:
        """The 16 kHz samples the chunk completes (possibly none)."""
        data = self._rest + data
        whole = len(data) - len(data) % self._frame
        self._rest = data[whole:]
        samples, _ = _decode_raw(data[:whole], self.fmt, self.rate, self.channels)
        mono = samples.mean(axis=1, dtype=np.float32) if self.channels > 1 else samples[:, 0]
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        return self._resampler.resample_chunk(mono) if self._resampler else mono
