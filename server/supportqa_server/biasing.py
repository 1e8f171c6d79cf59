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
        self._of_token_t = torch.from_numpy(cls)

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
        p1 = np.full(n, 1.0 / n)
        if preceded:
            ids = np.fromiter(preceded.keys(), dtype=np.int64)
            counts = np.fromiter((len(v) for v in preceded.values()), dtype=np.float64)
            total = counts.sum()
            p1 *= DISCOUNT * len(ids) / total
            p1[ids] += (counts - DISCOUNT) / total
        self._p1 = p1
        # Per context: (seen classes, their discounted probabilities, back-off weight).
        self._next: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, float]] = {}
        for ctx, c in follow.items():
            ids = np.fromiter(c.keys(), dtype=np.int64)
            counts = np.fromiter(c.values(), dtype=np.float64)
            s = counts.sum()
            self._next[ctx] = (ids, (counts - DISCOUNT) / s, DISCOUNT * len(ids) / s)
        self._cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def _mix(self, lower: np.ndarray, ctx: tuple[int, ...]) -> np.ndarray:
        seen = self._next.get(ctx)
        if seen is None:
            return lower
        ids, probs, backoff = seen
        p = lower * backoff
        p[ids] += probs
        return p

    def log_probs(self, context: Sequence[int]) -> torch.Tensor:
        """log P(class | the previous order-1 classes) for every class, (n_classes,) float32.

        ``context`` holds the classes so far (BOS-padded or not); only its tail is used.
        """
        key = tuple(context[-(self.order - 1) :])
        key = (BOS,) * (self.order - 1 - len(key)) + key
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        p = self._p1
        for k in range(1, self.order):
            p = self._mix(p, key[-k:])
        out = torch.from_numpy(np.log(p).astype(np.float32))
        self._cache[key] = out
        if len(self._cache) > CONTEXT_CACHE:
            self._cache.popitem(last=False)
        return out

    def score(self, text: str) -> float:
        """Mean log-probability per token of a text (for tests and diagnostics)."""
        seq = [*self.classes.encode(text), self.classes.eos]
        lps = [float(self.log_probs(seq[:i])[w]) for i, w in enumerate(seq)]
        return sum(lps) / len(lps)


class KnowledgeBias(LogitFilter):
    """A whisper LogitFilter fusing each row with its own knowledge-base model.

    Rows are clips, or clips times beams in beam search (row r belongs to clip r // beams).
    Only the text tokens are reweighted, and they keep the probability mass Whisper gave
    them together: whether to stop (eot) or emit a special token stays Whisper's call. KB
    texts are short single questions, so letting the model's end-of-text in cuts spoken
    questions after their first sentence.
    """

    def __init__(self, models: Sequence[KnowledgeLM | None], weight: float, sample_begin: int,
                 beams: int = 1, top_k: int | None = None) -> None:
        """``top_k``: fuse only each row's top_k text tokens by Whisper's logit, renormalised
        among themselves (the rest keep Whisper's logits); None fuses every text token. The
        vocabulary-wide gather and two log-sum-exps are a batched beam step's largest per-row
        cost; top_k skips them, at the price of tokens past Whisper's top_k the KB would have
        lifted."""
        self.models = list(models)
        self.weight = weight
        self.sample_begin = sample_begin
        self.beams = beams
        self.top_k = top_k

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        models = [self.models[row // self.beams] for row in range(logits.shape[0])]
        cls = next((m.classes for m in models if m is not None), None)
        if cls is None:
            return
        made_all = tokens[:, self.sample_begin :].tolist()  # one host copy for every row
        dists = [
            torch.zeros(cls.n_classes) if lm is None else lm.log_probs(
                [int(cls.of_token[t]) for t in made[-(lm.order - 1) :] if t < cls.eot])
            for lm, made in zip(models, made_all, strict=True)
        ]
        text = logits[:, : cls.eot]  # text tokens, eot excluded (a view)
        if self.top_k is None or self.top_k >= cls.eot:
            picked, idx = text, None
            # (R, eot): one column gather over the stacked distributions
            lp = torch.stack(dists).index_select(1, cls._of_token_t[: cls.eot])
        else:
            picked, idx = text.topk(self.top_k, dim=1, sorted=False)  # (R, K)
            # (R, K): each row's K from its own distribution
            lp = torch.stack([d[c] for d, c in zip(dists, cls._of_token_t[idx.cpu()],
                                                   strict=True)])
        lp = lp.to(logits.device)
        lp.mul_(self.weight)
        # The picked tokens keep their total mass. A row without a model adds zeros, and its
        # two log-sum-exps are equal, so it comes out bit for bit as it went in.
        before = torch.logsumexp(picked, 1, keepdim=True)
        fused = picked.add_(lp) if idx is None else picked + lp  # in place on the full view
        fused.add_(before - torch.logsumexp(fused, 1, keepdim=True))
        if idx is not None:
            text.scatter_(1, idx, fused)
