"""Text encoder: questions and knowledge-base texts into the shared dense vector space."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on sequences of at most 256 word pieces
# Inputs are padded to a few shapes: oneDNN builds (and keeps) kernels per input shape, and
# glibc keeps the freed buffers of odd sizes, so free-form shapes grew a server by ~1.5 GB
# (bfloat16; ~0.8 GB float32) over 1,500 random batches, against a flat +160 MB when the
# tokens are padded to a multiple of 8 and the rows to 1, 2, 4, then a multiple of 8.
PAD_TOKENS = 8


def padded_rows(n: int) -> int:
    """Rows a batch of n is padded to: 1, 2, 4, 8, then the next multiple of 8."""
    if n <= 8:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 8) * 8


def mean_pool(hidden, attention_mask):
    """Sentence vectors (N, H), not yet unit length: the mean of each text's token vectors
    (N, T, H) over its real tokens, padding left out (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceEncoder:
    """What every runtime of the sentence encoder shares: the tokenizer's padded batches
    (PAD_TOKENS, padded_rows), the token count, length-sorted batching. A runtime sets
    ``_tokenizer`` and ``dim`` and turns one padded batch into vectors (``_vectors``)."""

    _tokenizer = None
    _tensors = "np"  # the tokenizer's return_tensors for this runtime
    dim: int

    def count_tokens(self, text: str) -> int:
        """Word pieces of a text, special tokens left out (what a passage's budget counts)."""
        return len(self._tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _vectors(self, batch, n: int) -> np.ndarray:
        """(n, dim) unit float32 vectors of the first n rows of a padded batch."""
        raise NotImplementedError

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeds texts.

        Returns:
            float32 array (N, dim), each row of unit length.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        n = len(texts)
        batch = self._tokenizer(
            list(texts) + [""] * (padded_rows(n) - n), padding=True, truncation=True,
            max_length=MAX_TOKENS, pad_to_multiple_of=PAD_TOKENS, return_tensors=self._tensors,
        )
        return self._vectors(batch, n)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Word pieces each text takes in a forward pass (special tokens in, truncated)."""
        ids = self._tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS,
                              verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def encode_sorted(self, texts: list[str], batch_size: int = 64,
                      token_budget: int = 0) -> np.ndarray:
        """Embeds many texts in length-sorted batches (less padding); rows in input order.

        Args:
            batch_size: the most texts in one forward pass.
            token_budget: if > 0, a forward pass also holds at most this many tokens as
                padded (rows padded_rows(n) times the longest text rounded up to
                PAD_TOKENS): short questions go many to a pass, long ones few, so each pass
                costs about the same (token-budget batching). One text always fits.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for idx in batches_by_length(
                self.token_counts(texts) if token_budget > 0 else [len(t) for t in texts],
                batch_size, token_budget):
            out[idx] = self.encode([texts[i] for i in idx])
        return out


def batches_by_length(lengths: list[int], batch_size: int, token_budget: int = 0
                      ) -> list[list[int]]:
    """Indices of texts cut into forward passes, shortest first: at most batch_size texts a
    pass and, if token_budget > 0, at most token_budget padded tokens (see encode_sorted)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < batch_size and (
                token_budget <= 0 or padded_rows(len(out[-1]) + 1)
                * -(-lengths[i] // PAD_TOKENS) * PAD_TOKENS <= token_budget):
            out[-1].append(i)
        else:
            out.append([i])
    return out


class TextEncoder(SentenceEncoder):
    """A sentence encoder: mean pooling over the last hidden state, L2-normalised.

    Args:
        model: Local path or hub id of a BERT-like model; empty means the bundled MiniLM,
            "all-mpnet-base-v2" the packaged mpnet (text_models.py).
        device: torch device string ("cpu", "cuda:0", "mps").
        precision: auto | float32 | bfloat16 | float16 (devices.resolve_precision).
        cache_dir: where a packaged model is extracted; default the server's.
    """

    _tensors = "pt"

    def __init__(self, model: str = "", device: str = "cpu", precision: str = "auto",
                 cache_dir: Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from supportqa_server.runtime.devices import resolve_precision
        from supportqa_server.runtime.text_models import resolve_text_model

        self.model_name = resolve_text_model(model, cache_dir)
        self.device = device
        local = Path(self.model_name).exists()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(
                self.model_name, local_files_only=local
            )
            self._model = AutoModel.from_pretrained(self.model_name, local_files_only=local)
        except OSError as e:
            raise RuntimeError(
                f"cannot load text model {self.model_name!r}: give a local directory with "
                "config.json, tokenizer and weights, or a hub id that is in the HF cache"
            ) from e
        self.runtime = "torch"
        self.dtype = resolve_precision(precision, device)
        self._model.eval().to(device, self.dtype)
        self._torch = torch
        self.dim: int = int(self._model.config.hidden_size)

    def _vectors(self, batch, n: int) -> np.ndarray:
        torch = self._torch
        batch = batch.to(self.device)
        with torch.inference_mode():
            pooled = mean_pool(self._model(**batch).last_hidden_state, batch["attention_mask"])
            pooled = torch.nn.functional.normalize(pooled[:n].float(), dim=-1)
        return pooled.cpu().numpy()
