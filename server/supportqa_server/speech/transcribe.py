"""Speech recognition: batched openai-whisper with the encoder trimmed to the audio sent."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import whisper
from whisper.audio import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from whisper.model import Whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, Tokenizer, get_tokenizer

from supportqa_server.errors import InvalidInput
from supportqa_server.runtime.devices import resolve_precision
from supportqa_server.speech.biasing import KnowledgeBias, KnowledgeLM, TokenClasses
from supportqa_server.speech.decoding import (
    FeaturesTask,
    SharedPriorCrossAttention,
    SilencePrior,
    TrimmableAudioEncoder,
    cross_kv_per_utterance,
    keep_cross_attention_in_place,
    repeats,
    with_alternatives,
)
from supportqa_server.speech.whisper_convert import load_whisper

# 30 s: one decoder window; longer utterances go serial
MAX_UTTERANCE_SECONDS = N_SAMPLES / SAMPLE_RATE
TRIM_STEP_FRAMES = 100  # mel frames (1 s) an utterance's encoded length is rounded up to
TRIM_MARGIN_FRAMES = 100  # mel frames (1 s) of padding encoded after an utterance
TRIM_MIN_FRAMES = 200  # mel frames (2 s) encoded at least
# An utterance's padding frames sit at (its max log-mel - 4) / 4: about -1.0..-0.5 for speech. The
# silence prior is encoded lazily per level on this grid, clamped to its range, and the nearest
# one is used: at most 4 priors, ~40 MB each for tiny.en, ~75 MB for base (fp32), encoder and
# decoder cross-attention keys and values together.
PRIOR_LEVEL_STEP = 0.5
PRIOR_LEVEL_RANGE = (-1.5, 0.0)
LOOP_COMPRESSION_RATIO = 2.4  # gzip ratio of a transcript that repeats itself (whisper's)
MAX_TOKENS_BASE = 32  # token budget of an utterance: this plus MAX_TOKENS_PER_SECOND per second
MAX_TOKENS_PER_SECOND = 12  # (fast speech ~4 words/s, CJK ~3 tokens/character) so a
# repetition loop stops early instead of running to the 224-token decoder limit


NO_SPEECH_PROB = 0.6  # whisper.transcribe's no_speech_threshold
# Over NO_SPEECH_PROB, a text is believed only at this confidence or more. whisper.transcribe
# asks for avg_logprob under -1 (confidence 0.37) as well, but on tones, noise and Asterisk's
# prompts tiny.en's "you" came with 0.53-0.75 and no-speech 0.88-0.93 (docs/decisions.md).
NO_SPEECH_CONFIDENCE = 0.75


@dataclass(frozen=True)
class Transcription:
    """What was said in one utterance."""

    text: str  # the transcript, stripped; "" when nothing was recognised
    language: str  # ISO 639-1 code, as given or detected; "en" for English-only models
    no_speech_prob: float = math.nan  # Whisper's probability that the utterance holds no speech
    avg_logprob: float = math.nan  # mean log-probability per token of the decoded text
    # The beam search's other hypotheses: (text, its probability relative to ``text``'s),
    # most probable first; empty when decoded greedily.
    alternatives: tuple[tuple[str, float], ...] = ()

    @property
    def confidence(self) -> float:
        """How sure the decoder was of the text, in [0, 1]: the geometric mean of its token
        probabilities (exp of whisper's avg_logprob); NaN when unknown."""
        return math.exp(self.avg_logprob) if not math.isnan(self.avg_logprob) else math.nan

    def doubt(self, min_confidence: float) -> str | None:
        """Why the text should not be answered ("please repeat"), None when it can be: nothing
        recognised, a confidence under min_confidence, or a no-speech probability over 0.6
        without a confidence of NO_SPEECH_CONFIDENCE."""
        if not self.text.strip():
            return "nothing was recognised in the audio"
        conf = self.confidence
        if math.isnan(conf):
            return None
        if self.no_speech_prob > NO_SPEECH_PROB and conf < NO_SPEECH_CONFIDENCE:
            return (f"the audio sounds like no speech (no-speech probability "
                    f"{self.no_speech_prob:.2f})")
        if conf < min_confidence:
            return f"the transcript's confidence {conf:.2f} is below {min_confidence:.2f}"
        return None


def _device_name(device: str) -> str:
    try:
        return str(torch.device(device))
    except RuntimeError as e:
        raise ValueError(
            f"device {device!r} is not a torch device: use cpu, cuda, cuda:0 or mps"
        ) from e


class SpeechRecognizer:
    """Transcribes batches of short utterances with batched encoding and one decoding loop.

    Whisper pads every utterance to 30 s, so a 4 s question costs as much as a 30 s one. With
    ``trim_audio`` the encoder runs on each utterance plus TRIM_MARGIN_FRAMES of padding, rounded
    up to TRIM_STEP_FRAMES (at least TRIM_MIN_FRAMES), with the positional embedding sliced
    to match (the whisper.cpp ``audio_ctx`` trick): projections and MLPs, most of the
    encoder's work, follow the speech sent. What the cut drops is stood in for by a "silence
    prior", the encoding of a silent 30-s mel (once per padding level): its keys and values
    join each encoder self-attention, and its outputs fill the positions past the utterance, so
    the decoder still sees 1500. Without them the stock weights repeat the sentence until
    the token limit (decoder side) or lose words (encoder side); see docs/benchmarks/voice.md.

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
        lm_weight: float = 0.0,
        precision: str = "auto",
    ):
        """Loads the model.

        Args:
            model_name: "tiny.en" or "base" (converted from the bundled weights), another
                openai-whisper name already in whisper's cache, or a checkpoint path.
            device: "cpu", "cuda", "cuda:0" or "mps".
            cache_dir: where converted checkpoints are kept; see resolve_whisper_checkpoint.
            trim_audio: encode the speech sent rather than 30 s of padding.
            beam_size: beams for beam search; None decodes greedily.
            lm_weight: weight of a knowledge-base language model's log-probabilities added
                to Whisper's at each step, for utterances given one (see biasing.py); 0 is off.
            precision: auto | float32 | bfloat16 | float16 (devices.resolve_precision).
        """
        self._device = _device_name(device)
        self._model_name = model_name
        self.trim_audio = trim_audio
        self.model: Whisper = load_whisper(model_name, self._device, cache_dir).eval()
        self.model.encoder.__class__ = TrimmableAudioEncoder
        self._dtype = resolve_precision(precision, self._device)
        self._fp16 = self._dtype == torch.float16
        self._cast(self._dtype)
        self._options = whisper.DecodingOptions(
            task="transcribe",
            temperature=0.0,
            beam_size=beam_size,
            without_timestamps=True,
            fp16=self._fp16,
        )
        self._priors: dict[float, SilencePrior] = {}
        self.lm_weight = lm_weight
        self._classes: TokenClasses | None = None
        # Decode trimmed batches with the priors' cross-attention shared (same transcripts).
        self.shared_prior = True

    def _cast(self, dtype: torch.dtype) -> None:
        # Weights stored in the compute dtype, so whisper's per-call weight.to(x.dtype) is
        # free; its LayerNorm computes in float32 and wants float32 weights.
        self.model.to(dtype)
        for m in self.model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.float()

    @property
    def dtype(self) -> torch.dtype:
        """What the model computes in."""
        return self._dtype

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

    def _mel(self, utterance: np.ndarray, n_frames: int = N_FRAMES) -> torch.Tensor:
        """Log-mel of one utterance padded with silence as whisper.transcribe pads it to 30 s.

        Returns (n_mels, 3000) for n_frames = 3000. Below that, (n_mels, n_frames + 2): the
        frames up to n_frames and two of silence whose windows lie past the utterance, the last a
        frame of padding alone (its level picks the silence prior). Padding frames only ever
        hold whisper's floor (the utterance's maximum - 8), so the 30-s STFT's other frames add
        nothing: a 3-s utterance's mel costs ~0.5 against ~4 ms.
        """
        pad = N_SAMPLES if n_frames >= N_FRAMES else n_frames * HOP_LENGTH + N_FFT - len(utterance)
        mel = whisper.log_mel_spectrogram(torch.from_numpy(utterance), self.model.dims.n_mels,
                                          padding=pad)
        return mel[:, :N_FRAMES]

    def _n_frames(self, n_samples: int) -> int:
        """Mel frames to encode for an utterance of n_samples."""
        if not self.trim_audio:
            return N_FRAMES
        frames = math.ceil(n_samples / HOP_LENGTH) + TRIM_MARGIN_FRAMES
        frames = math.ceil(frames / TRIM_STEP_FRAMES) * TRIM_STEP_FRAMES
        return min(N_FRAMES, max(TRIM_MIN_FRAMES, frames))

    def _prior(self, level: float) -> SilencePrior:
        """The silence prior nearest an utterance's padding level (encoded on first use)."""
        lo, hi = PRIOR_LEVEL_RANGE
        key = round(round(min(max(level, lo), hi) / PRIOR_LEVEL_STEP) * PRIOR_LEVEL_STEP, 2)
        if key not in self._priors:
            mel = torch.full((1, self.model.dims.n_mels, N_FRAMES), key, dtype=self._dtype)
            prior = self.model.encoder.silence_prior(mel.to(self._device))
            cross = [(b.cross_attn.key(prior.features), b.cross_attn.value(prior.features))
                     for b in self.model.decoder.blocks]
            self._priors[key] = dataclasses.replace(prior, cross_kv=cross)
        return self._priors[key]

    def _encode(
        self, utterances: list[np.ndarray]
    ) -> tuple[torch.Tensor, list[SilencePrior | None], int]:
        """Encoder output for 30-s windows, (B, 1500, n_audio_state), with each row's silence
        prior (None for an untrimmed row) and the longest utterance part's length in positions.

        Untrimmed, one encoder call takes the whole batch. Trimmed, one call per length bucket
        (utterances rounded up to TRIM_STEP_FRAMES), so no utterance pays for a longer one and a
        utterance gets the same features whatever batch it comes in.
        """
        frames = [self._n_frames(len(c)) for c in utterances]
        mels = [self._mel(c, n) for c, n in zip(utterances, frames, strict=True)]
        if not self.trim_audio:
            features = self.model.encoder(torch.stack(mels).to(self._device, self._dtype))
            return features, [None] * len(utterances), features.shape[1]
        out: list[torch.Tensor] = [torch.empty(0)] * len(utterances)
        row_priors: list[SilencePrior | None] = [None] * len(utterances)
        n_utterances = 0
        for n in sorted(set(frames)):
            idx = [i for i, f in enumerate(frames) if f == n]
            mel = torch.stack([mels[i][:, :n] for i in idx]).to(self._device, self._dtype)
            if n == N_FRAMES:
                features = self.model.encoder(mel)
                for row, i in enumerate(idx):
                    out[i] = features[row]
                n_utterances = features.shape[1]
                continue
            priors = [self._prior(float(mels[i][:, -1].mean())) for i in idx]  # padding level
            features = self.model.encoder.forward_with_prior(mel, priors)  # (b, n / 2, D)
            n_ctx = features.shape[1]
            n_utterances = max(n_utterances, n_ctx)
            for row, (i, prior) in enumerate(zip(idx, priors, strict=True)):
                out[i] = torch.cat([features[row], prior.features[n_ctx:]])
                row_priors[i] = prior
        return torch.stack(out), row_priors, n_utterances

    def token_classes(self) -> TokenClasses:
        """The case-folded token classes of this model's tokenizer (built on first use)."""
        if self._classes is None:
            self._classes = TokenClasses(self._tokenizer("en"))
        return self._classes

    def knowledge_lm(self, texts) -> KnowledgeLM:
        """A knowledge-base language model for transcribe_batch's ``lms``, from its texts."""
        return KnowledgeLM(self.token_classes(), texts)

    def _run(self, features, options, lms, beams: int = 1, per_utterance_cross: bool = False):
        """One whisper decoding task on encoder outputs, fused with the utterances' KB models.

        ``per_utterance_cross``: the decoder's cross-attention is SharedPriorCrossAttention, so its
        keys and values are projected once per utterance (cross_kv_per_utterance).
        """
        task = FeaturesTask(self.model, options)
        if beams > 1:
            keep_cross_attention_in_place(task, self.model)
            if per_utterance_cross:
                cross_kv_per_utterance(task, self.model, features)
                task.drop_finished = features.shape[0] > 1
        if self.lm_weight > 0 and lms is not None and any(lms):
            task.logit_filters.append(
                KnowledgeBias(lms, self.lm_weight, task.sample_begin, beams)
            )
        results = task.run(features)
        return with_alternatives(results, task.sequence_ranker, task.tokenizer.decode)

    def _shared_prior_decode(self, features, row_priors, n_utterances, options, lms):
        """whisper.decode with the utterances' positions only and each prior's read once a step."""
        beams = options.beam_size or 1
        blocks = self.model.decoder.blocks
        try:
            for layer, block in enumerate(blocks):
                parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
                for prior in row_priors:  # utterances sharing a prior share its tensors
                    parts.setdefault(id(prior), (prior.cross_kv[layer][0][n_utterances:],
                                                 prior.cross_kv[layer][1][n_utterances:]))
                block.cross_attn.qkv_attention = SharedPriorCrossAttention(
                    block.cross_attn.n_head, [parts[id(pr)] for pr in row_priors], beams
                )
            return self._run(features[:, :n_utterances].contiguous(), options, lms, beams,
                             per_utterance_cross=True)
        finally:
            for block in blocks:
                block.cross_attn.__dict__.pop("qkv_attention", None)

    def _decode(self, features, row_priors, n_utterances, options, lms) -> list:
        """whisper's DecodingResults for encoded utterances, by the fastest route that applies."""
        language = options.language
        if self.shared_prior and all(row_priors) and (
            options.beam_size is None or language is not None
        ):
            return self._shared_prior_decode(features, row_priors, n_utterances, options, lms)
        n_utterances = features.shape[0]
        if options.beam_size is not None and n_utterances > 1 and language is None:
            # Beams over utterances whose language is to be detected: one utterance at a time
            # (FeaturesTask).
            return [self._run(features[i : i + 1], options, lms[i : i + 1],
                              options.beam_size)[0] for i in range(n_utterances)]
        return self._run(features, options, lms, options.beam_size or 1)

    @torch.inference_mode()
    def _decode_window(
        self, utterances: list[np.ndarray], language: str | None, lms: list[KnowledgeLM | None]
    ) -> list[Transcription]:
        """Decodes utterances of at most 30 s together: batched encoding, one decoding loop."""
        features, row_priors, n_utterances = self._encode(utterances)
        budgets = [self._token_budget(len(c)) for c in utterances]
        options = dataclasses.replace(self._options, language=language, sample_len=max(budgets))
        results = self._decode(features, row_priors, n_utterances, options, lms)
        # A language model can pull the decoder into a loop on speech far from its knowledge
        # base ("I'm going to be able to do that." over and over for "mend the coat before you
        # go out"). Such utterances are decoded again without it, as whisper.transcribe falls back
        # on a compression ratio over 2.4; shorter loops are caught by their repeated runs.
        looped = [i for i, (r, lm, budget) in enumerate(zip(results, lms, budgets, strict=True))
                  if lm is not None and (r.compression_ratio > LOOP_COMPRESSION_RATIO
                                         or len(r.tokens) >= budget or repeats(r.tokens))]
        if looped and self.lm_weight > 0:
            again = self._decode(features[looped], [row_priors[i] for i in looped], n_utterances,
                                 options, [None] * len(looped))
            for i, r in zip(looped, again, strict=True):
                results[i] = r
        out = []
        for r, budget in zip(results, budgets, strict=True):
            text = r.text
            if len(r.tokens) > budget:  # same cut as when the utterance is decoded alone
                text = self._tokenizer(r.language).decode(r.tokens[:budget])
            out.append(
                Transcription(
                    text=text.strip(),
                    language=r.language if self.multilingual else "en",
                    no_speech_prob=float(r.no_speech_prob),
                    avg_logprob=float(r.avg_logprob),
                    alternatives=getattr(r, "alternatives", ()),
                )
            )
        return out

    def _token_budget(self, n_samples: int) -> int:
        seconds = n_samples / SAMPLE_RATE
        return min(
            self.model.dims.n_text_ctx // 2,  # 224: whisper's own limit
            MAX_TOKENS_BASE + math.ceil(MAX_TOKENS_PER_SECOND * seconds),
        )

    def _tokenizer(self, language: str) -> Tokenizer:
        return get_tokenizer(
            self.multilingual,
            num_languages=self.model.num_languages,
            language=language,
            task="transcribe",
        )

    @torch.inference_mode()
    def _transcribe_long(self, utterance: np.ndarray, language: str | None) -> Transcription:
        """Utterances over 30 s: whisper's sliding 30-s windows, greedy, no timestamps in text."""
        # whisper.transcribe knows float16 and float32 only: a bfloat16 model decodes these
        # rare utterances in float32 (lossless round trip; ~0.1 s of casting against seconds of
        # decoding). Model calls run one at a time, so no batch sees the float32 weights.
        bf16 = self._dtype == torch.bfloat16
        if bf16:
            self._cast(torch.float32)
        try:
            result = self.model.transcribe(
                utterance,
                language=language,
                task="transcribe",
                temperature=0.0,
                beam_size=self._options.beam_size,
                fp16=self._fp16,
                condition_on_previous_text=False,
                verbose=None,
            )
        finally:
            if bf16:
                self._cast(self._dtype)
        return Transcription(
            text=result["text"].strip(),
            language=result["language"] if self.multilingual else "en",
            no_speech_prob=float(
                min((s["no_speech_prob"] for s in result["segments"]), default=math.nan)
            ),
            avg_logprob=float(np.mean([s["avg_logprob"] for s in result["segments"]]))
            if result["segments"] else math.nan,
        )

    def transcribe_batch(
        self,
        utterances: list[np.ndarray],
        language: str | None = None,
        lms: Sequence[KnowledgeLM | None] | None = None,
    ) -> list[Transcription]:
        """Transcribes several utterances at once.

        Utterances of up to 30 s are encoded in batches (the whole batch in one call untrimmed,
        one call per length bucket trimmed) and decoded in one batched greedy (or beam) loop;
        language detection, when needed, is batched too. An utterance's transcript does not depend
        on the batch it comes in. Longer utterances are transcribed one by one in 30-s windows.

        Args:
            utterances: float32 mono 16 kHz samples in [-1, 1] (what audio.decode_audio returns).
            language: ISO 639-1 code (or English name) spoken in every utterance; None or "" detects
                it per utterance. Ignored by English-only models, which always answer "en".
            lms: per utterance, the knowledge-base language model its decoding is fused with
                (None: plain Whisper); used when ``lm_weight`` > 0, for utterances up to 30 s.

        Returns:
            One Transcription per utterance, in order.

        Raises:
            InvalidInput: unknown language.
            ValueError: an utterance is not a non-empty 1-D array.
        """
        lang = self._language(language)
        arrays = []
        for i, utterance in enumerate(utterances):
            a = np.ascontiguousarray(utterance, dtype=np.float32)
            if a.ndim != 1 or a.size == 0:
                raise ValueError(
                    f"utterance {i} must be non-empty 1-D 16 kHz samples, got {a.shape}")
            arrays.append(a)
        out: list[Transcription | None] = [None] * len(arrays)
        short = [i for i, a in enumerate(arrays) if a.size <= N_SAMPLES]
        if short:
            models = list(lms) if lms is not None else [None] * len(arrays)
            found = self._decode_window([arrays[i] for i in short], lang,
                                        [models[i] for i in short])
            for i, t in zip(short, found, strict=True):
                out[i] = t
        for i, a in enumerate(arrays):
            if a.size > N_SAMPLES:
                out[i] = self._transcribe_long(a, lang)
        return out  # type: ignore[return-value]

    def transcribe(self, utterance: np.ndarray, language: str | None = None) -> Transcription:
        """Transcribes one utterance; see transcribe_batch."""
        return self.transcribe_batch([utterance], language)[0]
