"""The text encoder: what precision auto picks where, bfloat16 against float32, and the padded
input shapes that keep its memory flat."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from supportqa_server import devices
from supportqa_server.devices import resolve_precision
from supportqa_server.settings import Settings


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_follows_the_hardware(monkeypatch, native_bf16):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: native_bf16)
    assert resolve_precision("auto", "cpu") == (torch.bfloat16 if native_bf16 else torch.float32)
    assert resolve_precision("auto", "cuda:0") == torch.float16
    assert resolve_precision("auto", "mps") == torch.float32
    assert resolve_precision("float32", "cuda:1") == torch.float32
    assert resolve_precision("bfloat16", "cpu") == torch.bfloat16


def test_bad_precisions_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        resolve_precision("float16", "cpu")
    with pytest.raises(ValueError, match="'fp8' is not one of auto, float32"):
        resolve_precision("fp8", "cpu")
    monkeypatch.setenv("SUPPORTQA_PRECISION", "half")
    with pytest.raises(ValidationError, match="precision 'half' is not one of"):
        Settings()
    monkeypatch.setenv("SUPPORTQA_PRECISION", "bfloat16")
    assert Settings().precision == "bfloat16"


def test_bfloat16_embeddings_rank_as_float32(shared_data):
    """MiniLM in bfloat16: each embedding within cosine 0.999 of float32's, and the nearest
    knowledge-base row of nearly every question is the same row."""
    from supportqa_server.encoder import TextEncoder

    with open(shared_data / "text" / "banking77" / "train.csv", newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)][:600]
    kb, questions = texts[:500], texts[500:]
    out = {}
    for precision in ("float32", "bfloat16"):
        enc = TextEncoder(precision=precision)
        assert enc.dtype == getattr(torch, precision)
        out[precision] = enc.encode_sorted(kb, 64), enc.encode_sorted(questions, 16)
    (kb32, q32), (kb16, q16) = out["float32"], out["bfloat16"]
    assert kb16.dtype == np.float32
    assert float((kb16 * kb32).sum(1).min()) > 0.999
    assert float((q16 * q32).sum(1).min()) > 0.999
    same = ((q16 @ kb16.T).argmax(1) == (q32 @ kb32.T).argmax(1)).mean()
    assert same >= 0.97


def test_batches_are_padded_to_few_shapes(monkeypatch):
    """Rows go to 1, 2, 4, 8, then multiples of 8, tokens to multiples of 8; a text's vector
    does not depend on the batch around it or on the padding."""
    from supportqa_server import encoder as enc_mod
    from supportqa_server.encoder import TextEncoder, padded_rows

    assert [padded_rows(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 31, 64)] == [
        1, 2, 4, 8, 8, 16, 16, 24, 32, 64]
    enc = TextEncoder(precision="float32")
    shapes = []
    forward = enc._model.forward
    monkeypatch.setattr(enc._model, "forward",
                        lambda **kw: shapes.append(tuple(kw["input_ids"].shape)) or forward(**kw))
    texts = ["card lost", "how do I top up my account with a bank transfer from abroad?", "pin"]
    together = enc.encode(texts)
    assert shapes[-1][0] == 4 and shapes[-1][1] % enc_mod.PAD_TOKENS == 0
    alone = np.concatenate([enc.encode([t]) for t in texts])
    assert together.shape == (3, enc.dim)
    np.testing.assert_allclose(together, alone, atol=2e-5)
