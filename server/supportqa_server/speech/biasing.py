"""Knowledge-base language model for Whisper: shallow fusion towards the words a KB uses.

Whisper tiny.en mishears domain words that it has little prior for ("PIN" as "BIM", "top-up"
as "taper", "ATM" as "8AM"). The knowledge base says which words callers of this bot use, so
each decoding step adds ``weight * log P_kb(token | three previous tokens)`` to Whisper's
logits (shallow fusion, Gulcehre et al. 2015; Kannan et al. 2018). P_kb is a token 4-gram
(ORDER) with interpolated absolute discounting (Ney et al. 1994) over the KB's own texts. Tokens are
folded to lower case classes (" PIN" and " pin" are one class), so the KB's casing does not
matter. The interpolation ends in a uniform floor, so words the KB never uses stay reachable:
the model tilts close calls, it does not restrict the vocabulary.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from whisper.decoding import LogitFilter
from whisper.tokenizer import Tokenizer

ORDER = 4  # n-gram order: 4 had the lowest perplexity on BANKING77 dev questions (19.2; 3: 19.9)
DISCOUNT = 0.75  # absolute discount per seen n-gram (the usual value for KN-style models)
CONTEXT_CACHE = 4096  # distributions kept per model, by context; ~200 KB each for 51k tokens
BOS = -1  # context symbol before a text's first token


class TokenClasses:
    """Maps Whisper's text tokens to case-folded classes; eot is the end-of-text class."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        enc = tokenizer.encoding
        self.tokenizer = tokenizer
        self.eot = tokenizer.eot
        ids: dict[bytes, int] = {}
        cls = np.empty(self.eot + 1, dtype=np.int64)
        for t in range(self.eot):
            cls[t] = ids.setdefault(enc.decode_single_token_bytes(t).lower(), len(ids))
        self.eos = len(ids)
        cls[self.eot] = self.eos
        self.n_classes = self.eos + 1
        self.of_token = cls  # (eot + 1,) class of each text token and of eot

    def encode(self, text: str) -> list[int]:
        """Class ids of a text as Whisper would write it: leading space, then the text."""
        words = text.split()
        if not words:
            return []
        toks = self.tokenizer.encode(" " + " ".join(words))
        return [int(self.of_token[t]) for t in toks if t < self.eot]


class KnowledgeLM:
    """Interpolated absolute-discounting n-gram over token classes.

    The lowest order counts, Kneser-Ney style, the distinct classes each class follows rather
    than its occurrences: a class that only ever follows one other ("up" after "top") gets
    little weight where that other is absent.

    Every class the KB never uses gets only the uniform floor's share in any context, so a
    context's distribution is that one floor plus a vector over the classes the KB uses
    (``seen``: ~2.6k of Whisper's ~39k classes for BANKING77). ``lift`` returns that vector.
    """

    def __init__(self, classes: TokenClasses, texts: Iterable[str], order: int = ORDER) -> None:
        self.classes = classes
        self.order = order
        n = classes.n_classes
        preceded: dict[int, set[int]] = defaultdict(set)
        follow: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
        self.n_texts = 0
        pad = [BOS] * (order - 1)
        for text in texts:
            seq = classes.encode(text)
            if not seq:
                continue
            self.n_texts += 1
            seq = [*pad, *seq, classes.eos]
            for i in range(order - 1, len(seq)):
                w = seq[i]
                preceded[w].add(seq[i - 1])
                for k in range(1, order):
                    follow[tuple(seq[i - k : i])][w] += 1
        # Every class that follows a context also follows its last class, so `preceded`
        # holds every class any order gives mass to.
        self.seen = np.array(sorted(preceded), dtype=np.int64)  # (m,) classes, ascending
        at = np.full(n, -1, dtype=np.int64)
        at[self.seen] = np.arange(len(self.seen))
        self._floor1 = 1.0 / n
        self._p1 = np.empty(0)
        if preceded:
            counts = np.array([len(preceded[c]) for c in self.seen], dtype=np.float64)
            total = counts.sum()
            self._floor1 *= DISCOUNT * len(counts) / total
            self._p1 = self._floor1 + (counts - DISCOUNT) / total  # (m,)
        # Per context: (positions in `seen`, their discounted probabilities, back-off weight).
        self._next: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, float]] = {}
        for ctx, c in follow.items():
            ids = np.fromiter(c.keys(), dtype=np.int64)
            counts = np.fromiter(c.values(), dtype=np.float64)
            s = counts.sum()
            self._next[ctx] = (at[ids], (counts - DISCOUNT) / s, DISCOUNT * len(ids) / s)
        # Text tokens whose class the KB uses, and where their class sits in `seen`.
        text_at = at[classes.of_token[: classes.eot]]
        self.text_tokens = torch.from_numpy(np.flatnonzero(text_at >= 0))
        self.text_at = torch.from_numpy(text_at[text_at >= 0])
        self._cache: OrderedDict[tuple[int, ...], tuple[torch.Tensor, float]] = OrderedDict()

    def lift(self, context: Sequence[int]) -> tuple[torch.Tensor, float]:
        """(log P(c | context) - log floor for each class c in ``seen``, log floor).

        The floor is P(c | context) of every class not in ``seen``. The first item is a (m,)
        float32 tensor. ``context`` holds the classes so far (BOS-padded or not); only its
        tail is used.
        """
        key = tuple(context[-(self.order - 1) :])
        key = (BOS,) * (self.order - 1 - len(key)) + key
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        p, floor = self._p1, self._floor1
        for k in range(1, self.order):
            seen = self._next.get(key[-k:])
            if seen is not None:
                pos, probs, backoff = seen
                p = p * backoff
                p[pos] += probs
                floor *= backoff
        out = (torch.from_numpy(np.log(p / floor).astype(np.float32)), float(np.log(floor)))
        self._cache[key] = out
        if len(self._cache) > CONTEXT_CACHE:
            self._cache.popitem(last=False)
        return out

    def log_probs(self, context: Sequence[int]) -> torch.Tensor:
        """log P(class | the previous order-1 classes) for every class, (n_classes,) float32."""
        lift, log_floor = self.lift(context)
        out = torch.full((self.classes.n_classes,), log_floor, dtype=torch.float64)
        out[torch.from_numpy(self.seen)] += lift.double()
        return out.float()

    def score(self, text: str) -> float:
        """Mean log-probability per token of a text (for tests and diagnostics)."""
        seq = [*self.classes.encode(text), self.classes.eos]
        lps = [float(self.log_probs(seq[:i])[w]) for i, w in enumerate(seq)]
        return sum(lps) / len(lps)


class KnowledgeBias(LogitFilter):
    """A whisper LogitFilter fusing each row with its own knowledge-base model.

    Rows are utterances, or utterances times beams in beam search (row r belongs to utterance r //
    beams). Only the text tokens are reweighted, and they keep the probability mass Whisper gave
    them together: whether to stop (eot) or emit a special token stays Whisper's call. KB texts are
    short single questions, so letting the model's end-of-text in cuts spoken questions after their
    first sentence.

    Exact fusion, computed on the KB's own tokens only: adding ``weight * log floor`` to
    every text token changes nothing once the text mass is restored, so only the tokens
    whose class the KB uses move (by ``weight * lift``), and the text mass they change is
    summed over them alone. One log-sum-exp over each row's text tokens is the only pass
    over the whole vocabulary.
    """

    def __init__(self, models: Sequence[KnowledgeLM | None], weight: float, sample_begin: int,
                 beams: int = 1) -> None:
        self.models = list(models)
        self.weight = weight
        self.sample_begin = sample_begin
        self.beams = beams

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        if not any(self.models):
            return
        made_all = tokens[:, self.sample_begin :].tolist()  # one host copy for every row
        groups: dict[int, tuple[KnowledgeLM, list[int], list[torch.Tensor]]] = {}
        for row, made in enumerate(made_all):
            lm = self.models[row // self.beams]
            if lm is None:
                continue
            cls = lm.classes
            ctx = [int(cls.of_token[t]) for t in made[-(lm.order - 1) :] if t < cls.eot]
            _, rows, lifts = groups.setdefault(id(lm), (lm, [], []))
            rows.append(row)
            lifts.append(lm.lift(ctx)[0])
        for lm, rows, lifts in groups.values():
            self._fuse(logits, lm, rows, lifts)

    def _fuse(self, logits: torch.Tensor, lm: KnowledgeLM, rows: list[int],
              lifts: list[torch.Tensor]) -> None:
        dev = logits.device
        cols = lm.text_tokens.to(dev)
        every = len(rows) == logits.shape[0]
        r = None if every else torch.tensor(rows, device=dev)
        text = logits[:, : lm.classes.eot] if every else logits[r, : lm.classes.eot]
        before = torch.logsumexp(text, 1, keepdim=True)  # (R, 1) Whisper's text mass
        x = logits.index_select(1, cols) if every else text.index_select(1, cols)  # (R, C)
        delta = torch.stack(lifts).index_select(1, lm.text_at).to(dev).mul_(self.weight)
        # Text mass after fusion over before: 1 + sum over the moved tokens of p * (e^d - 1);
        # each term is above -p, so the sum stays above -1.
        shift = torch.log1p((x - before).exp_().mul_(torch.expm1(delta)).sum(1, keepdim=True))
        fused = x.add_(delta).sub_(shift)
        if every:
            logits[:, : lm.classes.eot].sub_(shift)
            logits.index_copy_(1, cols, fused)
        else:
            text.sub_(shift)
            text.index_copy_(1, cols, fused)
            logits[r, : lm.classes.eot] = text
