"""Speech recognition: batched openai-whisper with the encoder trimmed to the audio sent."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import whisper
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from whisper.model import AudioEncoder, Whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

from supportqa_server.errors import InvalidInput
from supportqa_server.whisper_convert import load_whisper

MAX_CLIP_SECONDS = N_SAMPLES / SAMPLE_RATE  # 30 s: one decoder window; longer clips go serial
TRIM_STEP_FRAMES = 100  # mel frames (1 s) the encoded length is rounded up to
TRIM_MARGIN_FRAMES = 100  # mel frames (1 s) of padding encoded after the longest clip
TRIM_MIN_FRAMES = 200  # mel frames (2 s) encoded at least
# Padding level of a clip's mel is (its max log-mel - 4) / 4: about -1.0..-0.5 for speech.
# Silence tails are encoded once per level on this grid (lazily) and the nearest one is used.
TAIL_LEVEL_STEP = 0.25
MAX_TOKENS_BASE = 32  # token budget of a clip: this plus MAX_TOKENS_PER_SECOND per second
MAX_TOKENS_PER_SECOND = 12  # (fast speech ~4 words/s, CJK ~3 tokens/character) so a
# repetition loop stops early instead of running to the 224-token decoder limit


@dataclass(frozen=True)
class Transcription:
    """What was said in one clip."""

    text: str  # the transcript, stripped; "" when nothing was recognised
    language: str  # ISO 639-1 code, as given or detected; "en" for English-only models
    no_speech_prob: float = math.nan  # Whisper's probability that the clip holds no speech


class _TrimmableAudioEncoder(AudioEncoder):
    """AudioEncoder that accepts mels shorter than 30 s (the whisper.cpp "audio_ctx" trick).

    The positional embedding is sliced to the input's length instead of asserting 1500
    positions. Installed per instance by swapping ``__class__``; openai-whisper is unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.gelu(self.conv1(x))  # (B, n_mels, T) -> (B, state, T)
        x = torch.nn.functional.gelu(self.conv2(x))  # stride 2: (B, state, T / 2)
        x = x.permute(0, 2, 1)  # (B, ctx, state)
        n_ctx = x.shape[1]
        if n_ctx > self.positional_embedding.shape[0]:
            raise ValueError(f"mel has {2 * n_ctx} frames; the encoder takes at most {N_FRAMES}")
        x = (x + self.positional_embedding[:n_ctx]).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


def _device_name(device: str) -> str:
    try:
        return str(torch.device(device))
    except RuntimeError as e:
        raise ValueError(
            f"device {device!r} is not a torch device: use cpu, cuda, cuda:0 or mps"
        ) from e


class SpeechRecognizer:
    """Transcribes batches of short clips with one encoder call and one decoding loop.

    Whisper pads every clip to 30 s, so a 4 s question costs as much as a 30 s one. With
    ``trim_audio`` the encoder runs only on the batch's longest clip plus TRIM_MARGIN_FRAMES,
    rounded up to TRIM_STEP_FRAMES (at least TRIM_MIN_FRAMES): its cost follows the speech
    sent. The decoder still cross-attends to 1500 positions: the rest are filled with the
    encoder output of a silent 30-s mel (a "silence tail", computed once per padding level).
    Decoding on the trimmed positions alone (the whisper.cpp ``audio_ctx`` trick) makes the
    stock weights repeat the sentence until the token limit; see docs/bench_voice.md.

    Not thread-safe: one caller (the micro-batcher's worker) at a time.
    """

    def __init__(
        self,
        model_name: str = "tiny.en",
        device: str = "cpu",
        *,
        cache_dir: Path | None = None,
        trim_audio: bool = True,
        beam_size: int | None = None,
    ):
        """Loads the model.

        Args:
            model_name: "tiny.en" or "base" (converted from the bundled weights), another
                openai-whisper name already in whisper's cache, or a checkpoint path.
            device: "cpu", "cuda", "cuda:0" or "mps"; cuda decodes in fp16, others in fp32.
            cache_dir: where converted checkpoints are kept; see resolve_whisper_checkpoint.
            trim_audio: encode the speech sent rather than 30 s of padding.
            beam_size: beams for beam search; None decodes greedily.
        """
        self._device = _device_name(device)
        self._model_name = model_name
        self.trim_audio = trim_audio
        self.model: Whisper = load_whisper(model_name, self._device, cache_dir).eval()
        self.model.encoder.__class__ = _TrimmableAudioEncoder
        self._fp16 = self._device.startswith("cuda")
        self._dtype = torch.float16 if self._fp16 else torch.float32
        self._options = whisper.DecodingOptions(
            task="transcribe",
            temperature=0.0,
            beam_size=beam_size,
            without_timestamps=True,
            fp16=self._fp16,
        )
        self._tails: dict[float, torch.Tensor] = {}

    @property
    def model_name(self) -> str:
        """The name or path the model was loaded from."""
        return self._model_name

    @property
    def device(self) -> str:
        """The torch device the model runs on, e.g. "cpu" or "cuda:0"."""
        return self._device

    @property
    def multilingual(self) -> bool:
        """False for English-only (".en") models."""
        return self.model.is_multilingual

    def _language(self, language: str | None) -> str | None:
        if not self.multilingual:
            return "en"
        if not language:
            return None
        code = language.strip().lower()
        code = TO_LANGUAGE_CODE.get(code, code)
        if code not in LANGUAGES:
            raise InvalidInput(
                f"language {language!r} is not one Whisper knows: use an ISO 639-1 code such "
                f"as 'en' or 'de', or leave it empty to detect"
            )
        return code

    def _mel(self, clip: np.ndarray) -> torch.Tensor:
        """Log-mel of one clip padded to 30 s as whisper.transcribe does: (n_mels, 3000)."""
        mel = whisper.log_mel_spectrogram(
            torch.from_numpy(clip), self.model.dims.n_mels, padding=N_SAMPLES
        )
        return mel[:, :N_FRAMES]

    def _n_frames(self, longest_samples: int) -> int:
        if not self.trim_audio:
            return N_FRAMES
        frames = math.ceil(longest_samples / HOP_LENGTH) + TRIM_MARGIN_FRAMES
        frames = math.ceil(frames / TRIM_STEP_FRAMES) * TRIM_STEP_FRAMES
        return min(N_FRAMES, max(TRIM_MIN_FRAMES, frames))

    def _tail(self, level: float) -> torch.Tensor:
        """Encoder output of a 30-s mel held at ``level`` (a silent clip): (1500, n_state)."""
        key = round(round(level / TAIL_LEVEL_STEP) * TAIL_LEVEL_STEP, 2)
        if key not in self._tails:
            mel = torch.full((1, self.model.dims.n_mels, N_FRAMES), key, dtype=self._dtype)
            self._tails[key] = self.model.encoder(mel.to(self._device))[0]
        return self._tails[key]

    def _encode(self, clips: list[np.ndarray]) -> torch.Tensor:
        """Encoder output for 30-s windows, trimmed or not: (B, 1500, n_audio_state)."""
        mels = [self._mel(c) for c in clips]
        n_frames = self._n_frames(max(len(c) for c in clips))
        mel = torch.stack([m[:, :n_frames] for m in mels]).to(self._device, self._dtype)
        features = self.model.encoder(mel)  # (B, n_frames / 2, n_audio_state)
        n_ctx = features.shape[1]
        if n_ctx == self.model.dims.n_audio_ctx:
            return features
        tails = [self._tail(float(m[:, -1].mean()))[n_ctx:] for m in mels]  # padding level
        return torch.cat([features, torch.stack(tails)], dim=1)

    @torch.inference_mode()
    def _decode_window(self, clips: list[np.ndarray], language: str | None) -> list[Transcription]:
        """Decodes clips of at most 30 s together: one encoder call, one decoding loop."""
        features = self._encode(clips)
        longest_s = max(len(c) for c in clips) / SAMPLE_RATE
        sample_len = min(
            self.model.dims.n_text_ctx // 2,
            MAX_TOKENS_BASE + math.ceil(MAX_TOKENS_PER_SECOND * longest_s),
        )
        options = dataclasses.replace(self._options, language=language, sample_len=sample_len)
        results = whisper.decode(self.model, features, options)
        return [
            Transcription(
                text=r.text.strip(),
                language=r.language if self.multilingual else "en",
                no_speech_prob=float(r.no_speech_prob),
            )
            for r in results
        ]

    @torch.inference_mode()
    def _transcribe_long(self, clip: np.ndarray, language: str | None) -> Transcription:
        """Clips over 30 s: whisper's sliding 30-s windows, greedy, no timestamps in text."""
        result = self.model.transcribe(
            clip,
            language=language,
            task="transcribe",
            temperature=0.0,
            beam_size=self._options.beam_size,
            fp16=self._fp16,
            condition_on_previous_text=False,
            verbose=None,
        )
        return Transcription(
            text=result["text"].strip(),
            language=result["language"] if self.multilingual else "en",
            no_speech_prob=float(
                min((s["no_speech_prob"] for s in result["segments"]), default=math.nan)
            ),
        )

    def transcribe_batch(
        self, clips: list[np.ndarray], language: str | None = None
    ) -> list[Transcription]:
        """Transcribes several clips at once.

        Clips of up to 30 s share one batched encoder call and one batched greedy (or beam)
        decoding loop; language detection, when needed, is batched too. Longer clips are
        transcribed one by one in 30-s windows.

        Args:
            clips: float32 mono 16 kHz samples in [-1, 1] (what audio.decode_audio returns).
            language: ISO 639-1 code (or English name) spoken in every clip; None or "" detects
                it per clip. Ignored by English-only models, which always answer "en".

        Returns:
            One Transcription per clip, in order.

        Raises:
            InvalidInput: unknown language.
            ValueError: a clip is not a non-empty 1-D array.
        """
        lang = self._language(language)
        arrays = []
        for i, clip in enumerate(clips):
            a = np.ascontiguousarray(clip, dtype=np.float32)
            if a.ndim != 1 or a.size == 0:
                raise ValueError(f"clip {i} must be non-empty 1-D 16 kHz samples, got {a.shape}")
            arrays.append(a)
        out: list[Transcription | None] = [None] * len(arrays)
        short = [i for i, a in enumerate(arrays) if a.size <= N_SAMPLES]
        if short:
            found = self._decode_window([arrays[i] for i in short], lang)
            for i, t in zip(short, found, strict=True):
                out[i] = t
        for i, a in enumerate(arrays):
            if a.size > N_SAMPLES:
                out[i] = self._transcribe_long(a, lang)
        return out  # type: ignore[return-value]

    def transcribe(self, clip: np.ndarray, language: str | None = None) -> Transcription:
        """Transcribes one clip; see transcribe_batch."""
        return self.transcribe_batch([clip], language)[0]
