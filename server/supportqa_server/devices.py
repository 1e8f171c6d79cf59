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
