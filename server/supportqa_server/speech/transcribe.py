"""Speech recognition: batched openai-whisper with the encoder trimmed to the audio sent."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from whisper.audio import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from whisper.decoding import BeamSearchDecoder, DecodingTask
from whisper.model import AudioEncoder, Whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, Tokenizer, get_tokenizer

from supportqa_server.errors import InvalidInput
from supportqa_server.runtime.devices import resolve_precision
from supportqa_server.speech.biasing import KnowledgeBias, KnowledgeLM, TokenClasses
from supportqa_server.speech.whisper_convert import load_whisper

MAX_CLIP_SECONDS = N_SAMPLES / SAMPLE_RATE  # 30 s: one decoder window; longer clips go serial
TRIM_STEP_FRAMES = 100  # mel frames (1 s) a clip's encoded length is rounded up to
TRIM_MARGIN_FRAMES = 100  # mel frames (1 s) of padding encoded after a clip
TRIM_MIN_FRAMES = 200  # mel frames (2 s) encoded at least
# A clip's padding frames sit at (its max log-mel - 4) / 4: about -1.0..-0.5 for speech. The
# silence prior is encoded lazily per level on this grid, clamped to its range, and the nearest
# one is used: at most 4 priors, ~40 MB each for tiny.en, ~75 MB for base (fp32), encoder and
# decoder cross-attention keys and values together.
PRIOR_LEVEL_STEP = 0.5
PRIOR_LEVEL_RANGE = (-1.5, 0.0)
LOOP_COMPRESSION_RATIO = 2.4  # gzip ratio of a transcript that repeats itself (whisper's)
LOOP_REPEATS = 3  # a run of 3-8 tokens said this often is a loop, not a question
MAX_TOKENS_BASE = 32  # token budget of a clip: this plus MAX_TOKENS_PER_SECOND per second
MAX_TOKENS_PER_SECOND = 12  # (fast speech ~4 words/s, CJK ~3 tokens/character) so a
# repetition loop stops early instead of running to the 224-token decoder limit


@dataclass(frozen=True)
class Transcription:
    """What was said in one clip."""

    text: str  # the transcript, stripped; "" when nothing was recognised
    language: str  # ISO 639-1 code, as given or detected; "en" for English-only models
    no_speech_prob: float = math.nan  # Whisper's probability that the clip holds no speech


@dataclass(frozen=True)
class _SilencePrior:
    """The encoder's view of a silent 30-s mel, standing in for the padding after a clip."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, self-attention K and V: (1500, D)
    features: torch.Tensor  # encoder output: (1500, D)
    # per decoder layer, cross-attention K and V of ``features``: (1500, D); set by
    # SpeechRecognizer._prior
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)


class _TrimmableAudioEncoder(AudioEncoder):
    """AudioEncoder that accepts mels shorter than 30 s (the whisper.cpp "audio_ctx" trick).

    The positional embedding is sliced to the input's length instead of asserting 1500
    positions. Installed per instance by swapping ``__class__``; openai-whisper is unchanged.
    """

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))  # (B, n_mels, T) -> (B, D, T)
        x = F.gelu(self.conv2(x))  # stride 2: (B, D, T / 2)
        x = x.permute(0, 2, 1)  # (B, ctx, D)
        n_ctx = x.shape[1]
        if n_ctx > self.positional_embedding.shape[0]:
            raise ValueError(f"mel has {2 * n_ctx} frames; the encoder takes at most {N_FRAMES}")
        return (x + self.positional_embedding[:n_ctx]).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)

    def silence_prior(self, mel: torch.Tensor) -> _SilencePrior:
        """Encodes one silent 30-s mel (1, n_mels, 3000), keeping each layer's K and V."""
        x = self._embed(mel)
        kv = []
        for block in self.blocks:
            h = block.attn_ln(x)
            kv.append((block.attn.key(h)[0], block.attn.value(h)[0]))
            x = block(x)
        return _SilencePrior(kv, self.ln_post(x)[0])

    def forward_with_prior(self, x: torch.Tensor, priors: list[_SilencePrior]) -> torch.Tensor:
        """Encodes trimmed mels whose self-attention also sees their priors' padding positions.

        In a 30-s window the speech positions attend to ~1000+ padding positions too; dropping
        those changes base's transcripts (WER 0.12 -> 0.16 on noisy questions). Their keys and
        values are taken from the silence prior instead: queries, projections and MLPs run on
        the clip's positions only, attention scores on (ctx x 1500).

        Args:
            x: mels (B, n_mels, T), T < 3000.
            priors: one per row of x.

        Returns:
            (B, T / 2, D).
        """
        x = self._embed(x)
        n_ctx = x.shape[1]
        for layer, block in enumerate(self.blocks):
            k_pad = torch.stack([p.kv[layer][0][n_ctx:] for p in priors])  # (B, 1500 - ctx, D)
            v_pad = torch.stack([p.kv[layer][1][n_ctx:] for p in priors])
            h = block.attn_ln(x)
            k = torch.cat([block.attn.key(h), k_pad], dim=1)  # (B, 1500, D)
            v = torch.cat([block.attn.value(h), v_pad], dim=1)
            attended, _ = block.attn.qkv_attention(block.attn.query(h), k, v)  # (B, ctx, D)
            x = x + block.attn.out(attended)
            x = x + block.mlp(block.mlp_ln(x))
        return self.ln_post(x)


class _BatchedBeamDecoder(BeamSearchDecoder):
    """whisper's beam search step with one topk and one host copy for all rows.

    whisper 20250625 calls topk and .item() per row and candidate: with 8 clips x 5 beams
    that was 14% of a batch's time. The candidates, their order and the float32 sums are
    the same, so the same beams survive (tests/test_transcribe.py compares the two).

    ``live``: the clips whose rows the batch still holds, in row order (_FeaturesTask drops
    finished clips); ``finished_sequences`` stays one entry per clip of the call.
    """

    live: list[int]

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, sum_logprobs: torch.Tensor):
        if tokens.shape[0] % self.beam_size != 0:
            raise ValueError(f"{tokens.shape}[0] % {self.beam_size} != 0")
        n_audio = tokens.shape[0] // self.beam_size
        if self.finished_sequences is None:
            self.finished_sequences = [{} for _ in range(n_audio)]
            self.live = list(range(n_audio))
        top_lp, top_tok = F.log_softmax(logits.float(), dim=-1).topk(self.beam_size + 1)
        new_lp = (sum_logprobs[:, None] + top_lp).tolist()  # float32 sums, as whisper's
        top_tok, prefixes = top_tok.tolist(), tokens.tolist()
        next_tokens, source_indices, kept, newly = [], [], [], []
        for i in range(n_audio):
            scores, sources, finished = {}, {}, {}
            for idx in range(i * self.beam_size, (i + 1) * self.beam_size):
                for lp, token in zip(new_lp[idx], top_tok[idx], strict=True):
                    sequence = (*prefixes[idx], token)
                    scores[sequence] = lp
                    sources[sequence] = idx
            saved = 0
            for sequence in sorted(scores, key=scores.get, reverse=True):
                if sequence[-1] == self.eot:
                    finished[sequence] = scores[sequence]
                else:
                    kept.append(scores[sequence])
                    next_tokens.append(sequence)
                    source_indices.append(sources[sequence])
                    saved += 1
                    if saved == self.beam_size:
                        break
            newly.append(finished)
        sum_logprobs[: len(kept)] = torch.tensor(kept, dtype=sum_logprobs.dtype)
        tokens = torch.tensor(next_tokens, device=tokens.device)
        self.inference.rearrange_kv_cache(source_indices)
        for previously, fresh in zip([self.finished_sequences[c] for c in self.live], newly,
                                     strict=True):
            for seq in sorted(fresh, key=fresh.get, reverse=True):
                if len(previously) >= self.max_candidates:
                    break
                previously[seq] = fresh[seq]
        completed = all(len(seqs) >= self.max_candidates for seqs in self.finished_sequences)
        return tokens, completed


class _FeaturesTask(DecodingTask):
    """whisper's decoding task fed encoder outputs of any length (stock: 1500 or a mel).

    With beams and a known language it also decodes several clips at once: openai-whisper
    20250625 repeats the tokens per beam but not the audio features (the decoder then fails
    on a batch of clips), so each clip's features are repeated here, as ``run`` expects when
    it takes every ``n_group``-th row back. Language detection would need them unrepeated;
    such batches decode clip by clip (see SpeechRecognizer._decode).
    """

    def __init__(self, model: Whisper, options) -> None:
        super().__init__(model, options)
        if type(self.decoder) is BeamSearchDecoder:
            self.decoder.__class__ = _BatchedBeamDecoder
        # Drop a clip's rows once its beam search has finished: set for beam search with
        # the cross-attention cache one row per clip (_cross_kv_per_clip).
        self.drop_finished = False

    def _main_loop(self, audio_features: torch.Tensor, tokens: torch.Tensor):
        """whisper's loop; with ``drop_finished``, a clip leaves the batch when its beam
        search has its candidates, so it stops costing decoder steps while longer clips go on
        (8 short questions: 14 steps for the batch, 10.5 a clip on average). A copy of
        whisper's loop, because that one keeps every row to the end: its ``sum_logprobs`` is
        sized to the first batch, and run() reshapes the tokens it returns by clip."""
        if not self.drop_finished:
            return super()._main_loop(audio_features, tokens)
        n_batch, beams, decoder = tokens.shape[0], self.n_group, self.decoder
        sum_logprobs = torch.zeros(n_batch, device=audio_features.device)
        no_speech_probs = [np.nan] * n_batch
        try:
            for i in range(self.sample_len):
                logits = self.inference.logits(tokens, audio_features)
                if i == 0 and self.tokenizer.no_speech is not None:
                    probs_at_sot = logits[:, self.sot_index].float().softmax(dim=-1)
                    no_speech_probs = probs_at_sot[:, self.tokenizer.no_speech].tolist()
                logits = logits[:, -1]
                for logit_filter in self.logit_filters:
                    logit_filter.apply(logits, tokens)
                tokens, completed = decoder.update(tokens, logits, sum_logprobs)
                if completed or tokens.shape[-1] > self.n_ctx:
                    break
                keep = [j for j, c in enumerate(decoder.live)
                        if len(decoder.finished_sequences[c]) < decoder.max_candidates]
                if len(keep) < len(decoder.live):
                    rows = [j * beams + b for j in keep for b in range(beams)]
                    tokens, sum_logprobs = tokens[rows], sum_logprobs[rows]
                    audio_features = audio_features[rows]
                    self._keep(keep, rows)
                    decoder.live = [decoder.live[j] for j in keep]
        finally:
            self.inference.cleanup_caching()
        # One row per beam of every clip again, as run() reshapes them. A dropped clip's rows
        # are never read: finalize() reads rows only for clips short of beam_size candidates.
        rows = [c * beams + b for c in decoder.live for b in range(beams)]
        full = tokens.new_full((n_batch, tokens.shape[1]), self.tokenizer.eot)
        full[rows] = tokens
        sums = sum_logprobs.new_zeros(n_batch)
        sums[rows] = sum_logprobs
        return full, sums, no_speech_probs

    def _keep(self, clips: list[int], rows: list[int]) -> None:
        """Keeps the given live clips (their positions among the live ones) and their rows in
        every per-row and per-clip state of the decoding."""
        cross = _cross_modules(self.model)
        for block in self.model.decoder.blocks:
            attention = vars(block.cross_attn).get("qkv_attention")
            if attention is not None:
                attention.keep(clips)
        cache = self.inference.kv_cache
        for module, t in cache.items():
            cache[module] = t[clips] if module in cross else t[rows]
        for logit_filter in self.logit_filters:
            if isinstance(logit_filter, KnowledgeBias):
                logit_filter.models = [logit_filter.models[j] for j in clips]

    def _get_audio_features(self, mel: torch.Tensor) -> torch.Tensor:
        if self.n_group > 1 and self.options.language is not None:
            return mel.repeat_interleave(self.n_group, dim=0)
        return mel

    def _detect_language(self, audio_features: torch.Tensor, tokens: torch.Tensor):
        # whisper.detect_language re-encodes inputs that are not (1500, D) long: say they are.
        dims = self.model.dims
        self.model.dims = dataclasses.replace(dims, n_audio_ctx=audio_features.shape[-2])
        try:
            languages, probs = super()._detect_language(audio_features, tokens)
        finally:
            self.model.dims = dims
        if self.n_group > 1 and self.options.language is not None:
            languages = languages[:: self.n_group]  # one per clip, not per repeated row
        return languages, probs


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H, T, e) -> (groups, H, B / groups * T, e): consecutive rows side by side."""
    b, h, t, e = x.shape
    return x.reshape(groups, b // groups, h, t, e).transpose(1, 2).reshape(groups, h, -1, e)


def _ungrouped(x: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """The inverse of _grouped: (groups, H, B / groups * T, e) -> (B, H, T, e)."""
    groups, h, _, e = x.shape
    return x.view(groups, h, b // groups, t, e).transpose(1, 2).reshape(b, h, t, e)


class _SharedPriorCrossAttention:
    """Decoder cross-attention that reads each clip's keys and values once for its beams.

    Trimmed, a clip's 1500 encoder positions are its own ~100-300 followed by its silence
    prior's; in a batch every row would carry (and each decoding step read) its own copy of
    both, 8 clips x 5 beams x 1500 x D per layer and step, though a clip's beams share its
    audio. Here ``k``/``v`` hold only the clips' positions (up to the longest clip's; shorter
    rows are filled with their prior's outputs, as the 1500-position form has them), of which
    one row per clip is read, for all its beams at once; each clip's prior keys and values
    past that point are read once for its beams too (or once for the whole batch when every
    clip has the same prior). Both are one batched product over clips. Softmax over both
    parts is exact attention over the same 1500 positions, summed in another order.

    Installed on a decoder block's ``cross_attn`` as the instance's ``qkv_attention`` for one
    decoding call. Beam search keeps clip i's beams in rows i * beams .. + beams - 1 (it
    regroups rows only within a clip, and _keep_cross_attention_in_place leaves the cross
    keys where they are), so rows i * beams .. hold clip i's audio and its prior.
    """

    def __init__(self, n_head: int, priors: list[tuple[torch.Tensor, torch.Tensor]],
                 beams: int = 1) -> None:
        """``priors``: per clip, its prior's keys and values past the clip part (L, D)."""
        self.n_head = n_head
        self.beams = beams
        d = priors[0][0].shape[-1] // n_head
        shared = all(kv is priors[0] for kv in priors)
        # keys, values past the clip part, head-major: (P, H, L, d), P = 1 when shared
        self.kp, self.vp = (
            torch.stack([x.view(-1, n_head, d).transpose(0, 1) for x in part])
            for part in zip(*(priors[:1] if shared else priors), strict=True)
        )
        # The clip part's keys and values stay the same tensors through a decoding call, so
        # their head-major copies, one row per clip, are made once: (k, keys, values).
        self._heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def keep(self, clips: list[int]) -> None:
        """Keeps only these clips' priors (positions among the current ones)."""
        if self.kp.shape[0] > 1:
            self.kp, self.vp = self.kp[clips], self.vp[clips]

    def _head_major(self, k: torch.Tensor, v: torch.Tensor, n_batch: int, h: int, d: int):
        if self._heads is None or self._heads[0] is not k:
            # one row per beam, or already one per clip (_cross_kv_per_clip)
            step = 1 if k.shape[0] * self.beams == n_batch else self.beams
            k1, v1 = k[::step], v[::step]  # (clips, C, D)
            n = k1.shape[0]
            self._heads = (k, k1.view(n, -1, h, d).permute(0, 2, 1, 3).contiguous(),
                           v1.view(n, -1, h, d).permute(0, 2, 1, 3).contiguous())
        return self._heads[1], self._heads[2]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None):
        n_batch, n_tok, n_state = q.shape
        h, d = self.n_head, n_state // self.n_head
        scale = d**-0.5
        qh = q.view(n_batch, n_tok, h, d).permute(0, 2, 1, 3)  # (B, H, T, d)
        kh, vh = self._head_major(k, v, n_batch, h, d)  # (clips, H, C, d)
        n_clips, n_priors = kh.shape[0], self.kp.shape[0]
        # (groups, H, rows * T, d) @ (groups, H, d, positions), back to (B, H, T, positions)
        s_clip = _ungrouped(_grouped(qh, n_clips) @ kh.transpose(-1, -2), n_batch, n_tok)
        s_prior = _ungrouped(_grouped(qh, n_priors) @ self.kp.transpose(-1, -2),
                             n_batch, n_tok)
        c = s_clip.shape[-1]
        w = (torch.cat([s_clip, s_prior], dim=-1).float() * scale).softmax(dim=-1).to(q.dtype)
        out = (_ungrouped(_grouped(w[..., :c], n_clips) @ vh, n_batch, n_tok)
               + _ungrouped(_grouped(w[..., c:], n_priors) @ self.vp, n_batch, n_tok))
        return out.permute(0, 2, 1, 3).flatten(start_dim=2), None


def _cross_kv_per_clip(task: DecodingTask, model: Whisper, features: torch.Tensor) -> None:
    """Beam search over (clips, C, D) features: cross-attention keys and values once per
    clip, put in the decoding's kv cache before its first step.

    Whisper computes them from the features repeated per beam, so a clip's 5 beam rows would
    project the same audio 5 times (8 layers of C x D x D each). Only _SharedPriorCrossAttention,
    which reads them per clip, may see this cache.

    whisper's TextDecoder takes its position offset from the cache's first entry, which is
    otherwise the first self-attention key (rows, tokens so far, D); it goes first here, empty,
    and the kv hook appends each step's keys to it as usual.
    """
    rows = features.shape[0] * task.n_group
    first = model.decoder.blocks[0].attn.key
    cache = {first: features.new_empty(rows, 0, first.out_features)}
    for block in model.decoder.blocks:
        cache[block.cross_attn.key] = block.cross_attn.key(features)
        cache[block.cross_attn.value] = block.cross_attn.value(features)
    task.inference.kv_cache, task.inference.hooks = model.install_kv_cache_hooks(cache)


def _repeats(tokens: list[int], times: int = LOOP_REPEATS) -> bool:
    """Whether some run of 3-8 tokens occurs ``times`` times: a loop too short for gzip to
    flag ("I don't know how to do it, I don't know how to do it, I don't know how ...")."""
    for n in range(3, 9):
        seen: dict[tuple[int, ...], int] = {}
        for i in range(len(tokens) - n + 1):
            gram = tuple(tokens[i : i + n])
            seen[gram] = seen.get(gram, 0) + 1
            if seen[gram] >= times:
                return True
    return False


def _cross_modules(model: Whisper) -> set:
    """The decoder's cross-attention key and value projections: their kv-cache entries hold
    audio positions, one row per beam (stock) or per clip (_cross_kv_per_clip)."""
    return {m for b in model.decoder.blocks for m in (b.cross_attn.key, b.cross_attn.value)}


def _keep_cross_attention_in_place(task: DecodingTask, model: Whisper) -> None:
    """Beam search: reorder only the self-attention caches when beams are regrouped.

    A clip's beams share its audio, so their cross-attention keys and values are equal and
    moving them between the clip's rows (all that regrouping does) changes nothing; stock
    whisper copies them every step (rows x positions x D per layer).
    """
    inference = task.inference
    cross = _cross_modules(model)

    def rearrange_kv_cache(source_indices) -> None:
        if source_indices != list(range(len(source_indices))):
            for module in inference.kv_modules:
                if module not in cross:
                    inference.kv_cache[module] = inference.kv_cache[module][source_indices]

    inference.rearrange_kv_cache = rearrange_kv_cache


def _device_name(device: str) -> str:
    try:
        return str(torch.device(device))
    except RuntimeError as e:
        raise ValueError(
            f"device {device!r} is not a torch device: use cpu, cuda, cuda:0 or mps"
        ) from e


class SpeechRecognizer:
    """Transcribes batches of short clips with batched encoding and one decoding loop.

    Whisper pads every clip to 30 s, so a 4 s question costs as much as a 30 s one. With
    ``trim_audio`` the encoder runs on each clip plus TRIM_MARGIN_FRAMES of padding, rounded
    up to TRIM_STEP_FRAMES (at least TRIM_MIN_FRAMES), with the positional embedding sliced
    to match (the whisper.cpp ``audio_ctx`` trick): projections and MLPs, most of the
    encoder's work, follow the speech sent. What the cut drops is stood in for by a "silence
    prior", the encoding of a silent 30-s mel (once per padding level): its keys and values
    join each encoder self-attention, and its outputs fill the positions past the clip, so
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
                to Whisper's at each step, for clips given one (see biasing.py); 0 is off.
            precision: auto | float32 | bfloat16 | float16 (devices.resolve_precision).
        """
        self._device = _device_name(device)
        self._model_name = model_name
        self.trim_audio = trim_audio
        self.model: Whisper = load_whisper(model_name, self._device, cache_dir).eval()
        self.model.encoder.__class__ = _TrimmableAudioEncoder
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
        self._priors: dict[float, _SilencePrior] = {}
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

    def _mel(self, clip: np.ndarray, n_frames: int = N_FRAMES) -> torch.Tensor:
        """Log-mel of one clip padded with silence as whisper.transcribe pads it to 30 s.

        Returns (n_mels, 3000) for n_frames = 3000. Below that, (n_mels, n_frames + 2): the
        frames up to n_frames and two of silence whose windows lie past the clip, the last a
        frame of padding alone (its level picks the silence prior). Padding frames only ever
        hold whisper's floor (the clip's maximum - 8), so the 30-s STFT's other frames add
        nothing: a 3-s clip's mel costs ~0.5 against ~4 ms.
        """
        pad = N_SAMPLES if n_frames >= N_FRAMES else n_frames * HOP_LENGTH + N_FFT - len(clip)
        mel = whisper.log_mel_spectrogram(torch.from_numpy(clip), self.model.dims.n_mels,
                                          padding=pad)
        return mel[:, :N_FRAMES]

    def _n_frames(self, n_samples: int) -> int:
        """Mel frames to encode for a clip of n_samples."""
        if not self.trim_audio:
            return N_FRAMES
        frames = math.ceil(n_samples / HOP_LENGTH) + TRIM_MARGIN_FRAMES
        frames = math.ceil(frames / TRIM_STEP_FRAMES) * TRIM_STEP_FRAMES
        return min(N_FRAMES, max(TRIM_MIN_FRAMES, frames))

    def _prior(self, level: float) -> _SilencePrior:
        """The silence prior nearest a clip's padding level (encoded on first use)."""
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
        self, clips: list[np.ndarray]
    ) -> tuple[torch.Tensor, list[_SilencePrior | None], int]:
        """Encoder output for 30-s windows, (B, 1500, n_audio_state), with each row's silence
        prior (None for an untrimmed row) and the longest clip part's length in positions.

        Untrimmed, one encoder call takes the whole batch. Trimmed, one call per length
        bucket (clips rounded up to TRIM_STEP_FRAMES), so no clip pays for a longer one and a
        clip gets the same features whatever batch it comes in.
        """
        frames = [self._n_frames(len(c)) for c in clips]
        mels = [self._mel(c, n) for c, n in zip(clips, frames, strict=True)]
        if not self.trim_audio:
            features = self.model.encoder(torch.stack(mels).to(self._device, self._dtype))
            return features, [None] * len(clips), features.shape[1]
        out: list[torch.Tensor] = [torch.empty(0)] * len(clips)
        row_priors: list[_SilencePrior | None] = [None] * len(clips)
        n_clip = 0
        for n in sorted(set(frames)):
            idx = [i for i, f in enumerate(frames) if f == n]
            mel = torch.stack([mels[i][:, :n] for i in idx]).to(self._device, self._dtype)
            if n == N_FRAMES:
                features = self.model.encoder(mel)
                for row, i in enumerate(idx):
                    out[i] = features[row]
                n_clip = features.shape[1]
                continue
            priors = [self._prior(float(mels[i][:, -1].mean())) for i in idx]  # padding level
            features = self.model.encoder.forward_with_prior(mel, priors)  # (b, n / 2, D)
            n_ctx = features.shape[1]
            n_clip = max(n_clip, n_ctx)
            for row, (i, prior) in enumerate(zip(idx, priors, strict=True)):
                out[i] = torch.cat([features[row], prior.features[n_ctx:]])
                row_priors[i] = prior
        return torch.stack(out), row_priors, n_clip

    def token_classes(self) -> TokenClasses:
        """The case-folded token classes of this model's tokenizer (built on first use)."""
        if self._classes is None:
            self._classes = TokenClasses(self._tokenizer("en"))
        return self._classes

    def knowledge_lm(self, texts) -> KnowledgeLM:
        """A knowledge-base language model for transcribe_batch's ``lms``, from its texts."""
        return KnowledgeLM(self.token_classes(), texts)

    def _run(self, features, options, lms, beams: int = 1, per_clip_cross: bool = False):
        """One whisper decoding task on encoder outputs, fused with the clips' KB models.

        ``per_clip_cross``: the decoder's cross-attention is _SharedPriorCrossAttention, so its
        keys and values are projected once per clip (_cross_kv_per_clip).
        """
        task = _FeaturesTask(self.model, options)
        if beams > 1:
            _keep_cross_attention_in_place(task, self.model)
            if per_clip_cross:
                _cross_kv_per_clip(task, self.model, features)
                task.drop_finished = features.shape[0] > 1
        if self.lm_weight > 0 and lms is not None and any(lms):
            task.logit_filters.append(
                KnowledgeBias(lms, self.lm_weight, task.sample_begin, beams)
            )
        return task.run(features)

    def _shared_prior_decode(self, features, row_priors, n_clip, options, lms):
        """whisper.decode with the clips' positions only and each prior's read once a step."""
        beams = options.beam_size or 1
        blocks = self.model.decoder.blocks
        try:
            for layer, block in enumerate(blocks):
                parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
                for prior in row_priors:  # clips sharing a prior share its tensors
                    parts.setdefault(id(prior), (prior.cross_kv[layer][0][n_clip:],
                                                 prior.cross_kv[layer][1][n_clip:]))
                block.cross_attn.qkv_attention = _SharedPriorCrossAttention(
                    block.cross_attn.n_head, [parts[id(pr)] for pr in row_priors], beams
                )
            return self._run(features[:, :n_clip].contiguous(), options, lms, beams,
                             per_clip_cross=True)
        finally:
            for block in blocks:
                block.cross_attn.__dict__.pop("qkv_attention", None)

    def _decode(self, features, row_priors, n_clip, options, lms) -> list:
        """whisper's DecodingResults for encoded clips, by the fastest route that applies."""
        language = options.language
        if self.shared_prior and all(row_priors) and (
            options.beam_size is None or language is not None
        ):
            return self._shared_prior_decode(features, row_priors, n_clip, options, lms)
        n_clips = features.shape[0]
        if options.beam_size is not None and n_clips > 1 and language is None:
            # Beams over clips whose language is to be detected: one clip at a time
            # (_FeaturesTask).
            return [self._run(features[i : i + 1], options, lms[i : i + 1],
                              options.beam_size)[0] for i in range(n_clips)]
        return self._run(features, options, lms, options.beam_size or 1)

    @torch.inference_mode()
    def _decode_window(
        self, clips: list[np.ndarray], language: str | None, lms: list[KnowledgeLM | None]
    ) -> list[Transcription]:
        """Decodes clips of at most 30 s together: batched encoding, one decoding loop."""
        features, row_priors, n_clip = self._encode(clips)
        budgets = [self._token_budget(len(c)) for c in clips]
        options = dataclasses.replace(self._options, language=language, sample_len=max(budgets))
        results = self._decode(features, row_priors, n_clip, options, lms)
        # A language model can pull the decoder into a loop on speech far from its knowledge
        # base ("I'm going to be able to do that." over and over for "mend the coat before you
        # go out"). Such clips are decoded again without it, as whisper.transcribe falls back
        # on a compression ratio over 2.4; shorter loops are caught by their repeated runs.
        looped = [i for i, (r, lm, budget) in enumerate(zip(results, lms, budgets, strict=True))
                  if lm is not None and (r.compression_ratio > LOOP_COMPRESSION_RATIO
                                         or len(r.tokens) >= budget or _repeats(r.tokens))]
        if looped and self.lm_weight > 0:
            again = self._decode(features[looped], [row_priors[i] for i in looped], n_clip,
                                 options, [None] * len(looped))
            for i, r in zip(looped, again, strict=True):
                results[i] = r
        out = []
        for r, budget in zip(results, budgets, strict=True):
            text = r.text
            if len(r.tokens) > budget:  # same cut as when the clip is decoded alone
                text = self._tokenizer(r.language).decode(r.tokens[:budget])
            out.append(
                Transcription(
                    text=text.strip(),
                    language=r.language if self.multilingual else "en",
                    no_speech_prob=float(r.no_speech_prob),
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
    def _transcribe_long(self, clip: np.ndarray, language: str | None) -> Transcription:
        """Clips over 30 s: whisper's sliding 30-s windows, greedy, no timestamps in text."""
        # whisper.transcribe knows float16 and float32 only: a bfloat16 model decodes these
        # rare clips in float32 (lossless round trip; ~0.1 s of casting against seconds of
        # decoding). Model calls run one at a time, so no batch sees the float32 weights.
        bf16 = self._dtype == torch.bfloat16
        if bf16:
            self._cast(torch.float32)
        try:
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
        finally:
            if bf16:
                self._cast(self._dtype)
        return Transcription(
            text=result["text"].strip(),
            language=result["language"] if self.multilingual else "en",
            no_speech_prob=float(
                min((s["no_speech_prob"] for s in result["segments"]), default=math.nan)
            ),
        )

    def transcribe_batch(
        self,
        clips: list[np.ndarray],
        language: str | None = None,
        lms: Sequence[KnowledgeLM | None] | None = None,
    ) -> list[Transcription]:
        """Transcribes several clips at once.

        Clips of up to 30 s are encoded in batches (the whole batch in one call untrimmed,
        one call per length bucket trimmed) and decoded in one batched greedy (or beam) loop;
        language detection, when needed, is batched too. A clip's transcript does not depend
        on the batch it comes in. Longer clips are transcribed one by one in 30-s windows.

        Args:
            clips: float32 mono 16 kHz samples in [-1, 1] (what audio.decode_audio returns).
            language: ISO 639-1 code (or English name) spoken in every clip; None or "" detects
                it per clip. Ignored by English-only models, which always answer "en".
            lms: per clip, the knowledge-base language model its decoding is fused with
                (None: plain Whisper); used when ``lm_weight`` > 0, for clips up to 30 s.

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
            models = list(lms) if lms is not None else [None] * len(arrays)
            found = self._decode_window([arrays[i] for i in short], lang,
                                        [models[i] for i in short])
            for i, t in zip(short, found, strict=True):
                out[i] = t
        for i, a in enumerate(arrays):
            if a.size > N_SAMPLES:
                out[i] = self._transcribe_long(a, lang)
        return out  # type: ignore[return-value]

    def transcribe(self, clip: np.ndarray, language: str | None = None) -> Transcription:
        """Transcribes one clip; see transcribe_batch."""
        return self.transcribe_batch([clip], language)[0]
