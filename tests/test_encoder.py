"""The text encoder: what precision auto picks where, bfloat16 against float32, and the padded
input shapes that keep its memory flat."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from supportqa_server.runtime import devices
from supportqa_server.runtime.devices import resolve_precision
from supportqa_server.runtime.settings import Settings


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_follows_the_hardware(monkeypatch, native_bf16):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: native_bf16)
    assert resolve_precision("auto", "cpu") == (torch.bfloat16 if native_bf16 else torch.float32)
    assert resolve_precision("auto", "cuda:0") == torch.float16
    assert resolve_precision("auto", "mps") == torch.float32
    assert resolve_precision("float32", "cuda:1") == torch.float32
    assert resolve_precision("bfloat16", "cpu") == torch.bfloat16


PROBE = """\
import torch
from supportqa_server.runtime.devices import cpu_has_bf16, resolve_precision


def test_auto_picks_bfloat16():
    assert cpu_has_bf16()
    assert resolve_precision("auto", "cpu") == torch.bfloat16
    assert resolve_precision("auto", "cuda:0") == torch.float16
"""


def test_bf16_plugin_makes_auto_pick_bfloat16(tmp_path):
    """tests/bf16_plugin.py runs tests as on a CPU with native bfloat16, whatever this one has:

        PYTHONPATH=tests python -m pytest -p bf16_plugin tests/

    Here on a probe test, in a pytest of its own."""
    tests = Path(__file__).resolve().parent
    (tmp_path / "test_probe.py").write_text(PROBE)
    path = os.pathsep.join(p for p in (str(tests), os.environ.get("PYTHONPATH", "")) if p)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "bf16_plugin", "-p", "no:cacheprovider",
         "test_probe.py"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout and "bf16_plugin: this CPU claims AVX512-BF16" in r.stdout


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
    from supportqa_server.runtime.encoder import TextEncoder

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
    from supportqa_server.runtime import encoder as enc_mod
    from supportqa_server.runtime.encoder import TextEncoder, padded_rows

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
