"""Resolves the configured accelerator name to a torch device and sizes CPU threads."""

from __future__ import annotations

import os


def resolve_device(name: str) -> str:
    """Maps auto|cpu|cuda|cuda:N|mps to a device torch can use, failing clearly if absent."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {name!r} was asked for but torch sees no CUDA GPU; "
                "install a CUDA build of torch or set SUPPORTQA_DEVICE=cpu"
            )
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {name!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)"
            )
        return f"cuda:{index}"
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was asked for but this torch has no MPS support")
    return name


def configure_threads(torch_threads: int) -> int:
    """Sets torch intra-op threads (0 = every core) and returns the number used."""
    import torch

    n = torch_threads or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def check_precision(name: str) -> str:
    """The name, if it is one of PRECISIONS.

    Raises:
        ValueError: it is not.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
    return name


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    import torch

    cpu = torch.cpu
    return bool(
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    )


def resolve_precision(name: str, device: str):
    """Maps auto|float32|bfloat16|float16 to the torch dtype models run in on ``device``.

    auto: float16 on CUDA; bfloat16 on a CPU with native bfloat16 (AMX or AVX512-BF16: on 2
    Sapphire Rapids cores a batch of 64 MiniLM sentences runs 2.3x faster than float32, with
    embeddings at cosine 0.9999 to float32's; docs/benchmarks/text.md); float32 elsewhere.

    Raises:
        ValueError: an unknown name, or float16 asked for on a CPU (slow, and some CPU kernels
            lack it).
    """
    import torch

    if check_precision(name) == "auto":
        if device.startswith("cuda"):
            return torch.float16
        if device == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if name == "float16" and device == "cpu":
        raise ValueError("precision float16 is not supported on CPU: use bfloat16 or float32")
    return getattr(torch, name)
