"""Whisper's decoding, batched: an encoder trimmed to the audio sent with a silence prior for
the rest, one beam loop over a batch of utterances, cross-attention shared across beams."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from whisper.audio import N_FRAMES
from whisper.decoding import BeamSearchDecoder, DecodingResult, DecodingTask
from whisper.model import AudioEncoder, Whisper

from supportqa_server.speech.biasing import KnowledgeBias

LOOP_REPEATS = 3  # a run of 3-8 tokens said this often is a loop, not a question


@dataclass(frozen=True)
class SilencePrior:
    """The encoder's view of a silent 30-s mel, standing in for the padding after an utterance."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, self-attention K and V: (1500, D)
    features: torch.Tensor  # encoder output: (1500, D)
    # per decoder layer, cross-attention K and V of ``features``: (1500, D); set by
    # SpeechRecognizer._prior
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)


class TrimmableAudioEncoder(AudioEncoder):
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

    def silence_prior(self, mel: torch.Tensor) -> SilencePrior:
        """Encodes one silent 30-s mel (1, n_mels, 3000), keeping each layer's K and V."""
        x = self._embed(mel)
        kv = []
        for block in self.blocks:
            h = block.attn_ln(x)
            kv.append((block.attn.key(h)[0], block.attn.value(h)[0]))
            x = block(x)
        return SilencePrior(kv, self.ln_post(x)[0])

    def forward_with_prior(self, x: torch.Tensor, priors: list[SilencePrior]) -> torch.Tensor:
        """Encodes trimmed mels whose self-attention also sees their priors' padding positions.

        In a 30-s window the speech positions attend to ~1000+ padding positions too; dropping
        those changes base's transcripts (WER 0.12 -> 0.16 on noisy questions). Their keys and
        values are taken from the silence prior instead: queries, projections and MLPs run on
        the utterance's positions only, attention scores on (ctx x 1500).

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


class BatchedBeamDecoder(BeamSearchDecoder):
    """whisper's beam search step with one topk and one host copy for all rows.

    whisper 20250625 calls topk and .item() per row and candidate: with 8 utterances x 5 beams
    that was 14% of a batch's time. The candidates, their order and the float32 sums are
    the same, so the same beams survive (tests/test_transcribe.py compares the two).

    ``live``: the utterances whose rows the batch still holds, in row order (FeaturesTask drops
    finished utterances); ``finished_sequences`` stays one entry per utterance of the call.
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


@dataclass(frozen=True)
class NBestResult(DecodingResult):
    """whisper's result with the beam search's other hypotheses: (text, probability of the
    whole text relative to the chosen one's), distinct, most probable first."""

    alternatives: tuple[tuple[str, float], ...] = ()


class NBestRanker:
    """whisper's sequence ranker, keeping what it ranks: per utterance, every finished beam
    candidate's tokens and summed log-probability."""

    def __init__(self, ranker) -> None:
        self.ranker = ranker
        self.candidates: list[list[tuple[list[int], float]]] = []

    def rank(self, tokens, sum_logprobs):
        self.candidates = [[(t.tolist(), float(lp)) for t, lp in zip(ts, lps, strict=True)]
                           for ts, lps in zip(tokens, sum_logprobs, strict=True)]
        return self.ranker.rank(tokens, sum_logprobs)


def with_alternatives(results: list, ranker: NBestRanker, decode) -> list[NBestResult]:
    """The results with their utterances' other hypotheses (decode: token ids -> text)."""
    out = []
    for r, candidates in zip(results, ranker.candidates, strict=True):
        best = next((lp for t, lp in candidates if t == list(r.tokens)), None)
        alts, seen = [], {r.text.strip().lower()}
        for tokens, lp in sorted(candidates, key=lambda c: -c[1]):
            text = decode(tokens).strip()
            if best is None or not text or text.lower() in seen:
                continue
            seen.add(text.lower())
            alts.append((text, float(np.exp(min(0.0, lp - best)))))
        fields = {f.name: getattr(r, f.name) for f in dataclasses.fields(DecodingResult)}
        out.append(NBestResult(**fields, alternatives=tuple(alts)))
    return out


class FeaturesTask(DecodingTask):
    """whisper's decoding task fed encoder outputs of any length (stock: 1500 or a mel).

    With beams and a known language it also decodes several utterances at once: openai-whisper
    20250625 repeats the tokens per beam but not the audio features (the decoder then fails on a
    batch of utterances), so each utterance's features are repeated here, as ``run`` expects when it
    takes every ``n_group``-th row back. Language detection would need them unrepeated; such batches
    decode utterance by utterance (see SpeechRecognizer._decode).
    """

    def __init__(self, model: Whisper, options) -> None:
        super().__init__(model, options)
        if type(self.decoder) is BeamSearchDecoder:
            self.decoder.__class__ = BatchedBeamDecoder
        self.sequence_ranker = NBestRanker(self.sequence_ranker)
        # Drop an utterance's rows once its beam search has finished: set for beam search with
        # the cross-attention cache one row per utterance (cross_kv_per_utterance).
        self.drop_finished = False

    def _main_loop(self, audio_features: torch.Tensor, tokens: torch.Tensor):
        """whisper's loop; with ``drop_finished``, an utterance leaves the batch when its beam
        search has its candidates, so it stops costing decoder steps while longer utterances go on
        (8 short questions: 14 steps for the batch, 10.5 an utterance on average). A copy of
        whisper's loop, because that one keeps every row to the end: its ``sum_logprobs`` is
        sized to the first batch, and run() reshapes the tokens it returns by utterance."""
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
        # One row per beam of every utterance again, as run() reshapes them. A dropped utterance's
        # rows are never read: finalize() reads rows only for utterances short of beam_size
        # candidates.
        rows = [c * beams + b for c in decoder.live for b in range(beams)]
        full = tokens.new_full((n_batch, tokens.shape[1]), self.tokenizer.eot)
        full[rows] = tokens
        sums = sum_logprobs.new_zeros(n_batch)
        sums[rows] = sum_logprobs
        return full, sums, no_speech_probs

    def _keep(self, utterances: list[int], rows: list[int]) -> None:
        """Keeps the given live utterances (their positions among the live ones) and their rows in
        every per-row and per-utterance state of the decoding."""
        cross = _cross_modules(self.model)
        for block in self.model.decoder.blocks:
            attention = vars(block.cross_attn).get("qkv_attention")
            if attention is not None:
                attention.keep(utterances)
        cache = self.inference.kv_cache
        for module, t in cache.items():
            cache[module] = t[utterances] if module in cross else t[rows]
        for logit_filter in self.logit_filters:
            if isinstance(logit_filter, KnowledgeBias):
                logit_filter.models = [logit_filter.models[j] for j in utterances]

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
            languages = languages[:: self.n_group]  # one per utterance, not per repeated row
        return languages, probs


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H, T, e) -> (groups, H, B / groups * T, e): consecutive rows side by side."""
    b, h, t, e = x.shape
    return x.reshape(groups, b // groups, h, t, e).transpose(1, 2).reshape(groups, h, -1, e)


def _ungrouped(x: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """The inverse of _grouped: (groups, H, B / groups * T, e) -> (B, H, T, e)."""
    groups, h, _, e = x.shape
    return x.view(groups, h, b // groups, t, e).transpose(1, 2).reshape(b, h, t, e)


class SharedPriorCrossAttention:
    """Decoder cross-attention that reads each utterance's keys and values once for its beams.

    Trimmed, an utterance's 1500 encoder positions are its own ~100-300 followed by its silence
    prior's; in a batch every row would carry (and each decoding step read) its own copy of both, 8
    utterances x 5 beams x 1500 x D per layer and step, though an utterance's beams share its audio.
    Here ``k``/``v`` hold only the utterances' positions (up to the longest utterance's; shorter
    rows are filled with their prior's outputs, as the 1500-position form has them), of which one
    row per utterance is read, for all its beams at once; each utterance's prior keys and values
    past that point are read once for its beams too (or once for the whole batch when every
    utterance has the same prior). Both are one batched product over utterances. Softmax over both
    parts is exact attention over the same 1500 positions, summed in another order.

    Installed on a decoder block's ``cross_attn`` as the instance's ``qkv_attention`` for one
    decoding call. Beam search keeps utterance i's beams in rows i * beams .. + beams - 1 (it
    regroups rows only within an utterance, and keep_cross_attention_in_place leaves the cross
    keys where they are), so rows i * beams .. hold utterance i's audio and its prior.
    """

    def __init__(self, n_head: int, priors: list[tuple[torch.Tensor, torch.Tensor]],
                 beams: int = 1) -> None:
        """``priors``: per utterance, its prior's keys and values past the utterance part (L, D)."""
        self.n_head = n_head
        self.beams = beams
        d = priors[0][0].shape[-1] // n_head
        shared = all(kv is priors[0] for kv in priors)
        # keys, values past the utterance part, head-major: (P, H, L, d), P = 1 when shared
        self.kp, self.vp = (
            torch.stack([x.view(-1, n_head, d).transpose(0, 1) for x in part])
            for part in zip(*(priors[:1] if shared else priors), strict=True)
        )
        # The utterance part's keys and values stay the same tensors through a decoding call, so
        # their head-major copies, one row per utterance, are made once: (k, keys, values).
        self._heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def keep(self, utterances: list[int]) -> None:
        """Keeps only these utterances' priors (positions among the current ones)."""
        if self.kp.shape[0] > 1:
            self.kp, self.vp = self.kp[utterances], self.vp[utterances]

    def _head_major(self, k: torch.Tensor, v: torch.Tensor, n_batch: int, h: int, d: int):
        if self._heads is None or self._heads[0] is not k:
            # one row per beam, or already one per utterance (cross_kv_per_utterance)
            step = 1 if k.shape[0] * self.beams == n_batch else self.beams
            k1, v1 = k[::step], v[::step]  # (utterances, C, D)
            n = k1.shape[0]
            self._heads = (k, k1.view(n, -1, h, d).permute(0, 2, 1, 3).contiguous(),
                           v1.view(n, -1, h, d).permute(0, 2, 1, 3).contiguous())
        return self._heads[1], self._heads[2]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None):
        n_batch, n_tok, n_state = q.shape
        h, d = self.n_head, n_state // self.n_head
        scale = d**-0.5
        qh = q.view(n_batch, n_tok, h, d).permute(0, 2, 1, 3)  # (B, H, T, d)
        kh, vh = self._head_major(k, v, n_batch, h, d)  # (utterances, H, C, d)
        n_utterances, n_priors = kh.shape[0], self.kp.shape[0]
        # (groups, H, rows * T, d) @ (groups, H, d, positions), back to (B, H, T, positions)
        s_utterance = _ungrouped(_grouped(qh, n_utterances) @ kh.transpose(-1, -2), n_batch, n_tok)
        s_prior = _ungrouped(_grouped(qh, n_priors) @ self.kp.transpose(-1, -2),
                             n_batch, n_tok)
        c = s_utterance.shape[-1]
        w = (torch.cat([s_utterance, s_prior], dim=-1).float() * scale).softmax(dim=-1).to(q.dtype)
        out = (_ungrouped(_grouped(w[..., :c], n_utterances) @ vh, n_batch, n_tok)
               + _ungrouped(_grouped(w[..., c:], n_priors) @ self.vp, n_batch, n_tok))
        return out.permute(0, 2, 1, 3).flatten(start_dim=2), None


def cross_kv_per_utterance(task: DecodingTask, model: Whisper, features: torch.Tensor) -> None:
    """Beam search over (utterances, C, D) features: cross-attention keys and values once per
    utterance, put in the decoding's kv cache before its first step.

    Whisper computes them from the features repeated per beam, so an utterance's 5 beam rows would
    project the same audio 5 times (8 layers of C x D x D each). Only SharedPriorCrossAttention,
    which reads them per utterance, may see this cache.

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


def repeats(tokens: list[int], times: int = LOOP_REPEATS) -> bool:
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
    audio positions, one row per beam (stock) or per utterance (cross_kv_per_utterance)."""
    return {m for b in model.decoder.blocks for m in (b.cross_attn.key, b.cross_attn.value)}


def keep_cross_attention_in_place(task: DecodingTask, model: Whisper) -> None:
    """Beam search: reorder only the self-attention caches when beams are regrouped.

    An utterance's beams share its audio, so their cross-attention keys and values are equal and
    moving them between the utterance's rows (all that regrouping does) changes nothing; stock
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
