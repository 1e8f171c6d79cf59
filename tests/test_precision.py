"""Compute precision: what auto picks where, and bfloat16 text embeddings against float32."""

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
