"""A pytest plugin that makes this CPU look like one with native bfloat16 (AVX512-BF16).

precision "auto" (supportqa_server.runtime.devices.resolve_precision) picks bfloat16 on a CPU
where devices.cpu_has_bf16() is true, and float32 elsewhere, so a test that passes here on an
AVX2-only CPU may fail on a Sapphire Rapids one. This plugin makes cpu_has_bf16() true
everywhere: auto then picks bfloat16 as it would there (torch runs bfloat16 on any x86-64 CPU,
only slower without the native instructions), and the suite can be checked for both choices
on one machine. Run it from the repository root with the tests directory on the import path:

    PYTHONPATH=tests .venv/bin/python -m pytest -p bf16_plugin tests/

(`-p NAME` imports NAME as a module before collection, hence PYTHONPATH). Tests that monkeypatch
devices.cpu_has_bf16 themselves still decide for themselves.

Emulated bfloat16 is slow: on a 2-core AVX2 CPU MiniLM encodes the sample knowledge base 7x
slower than in float32, and tiny.en transcribes 4-8x slower, where native bfloat16 is faster
than float32. So that tests fail on what the models hear and rank, not on this emulation's
speed, the plugin, on a CPU without native bfloat16 only: lifts the servers' queue-wait limits
(SUPPORTQA_MAX_QUEUE_MS and SUPPORTQA_SPEECH_MAX_QUEUE_MS = 0, "no limit but the deadline",
unless set) and multiplies the clients' default deadline by SLOWDOWN. Deadlines and limits a
test sets itself are kept.
"""

from __future__ import annotations

import os

import pytest
import torch

SLOWDOWN = 10  # default client deadlines are multiplied by this while bfloat16 is emulated

_NATIVE = bool(
    getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
)


def _native_bf16() -> bool:
    return True


def _patch() -> None:
    # devices.cpu_has_bf16 looks these up on torch.cpu at each call: AMX tiles or AVX512-BF16.
    torch.cpu._is_avx512_bf16_supported = _native_bf16


def _allow_for_emulation() -> None:
    if _NATIVE:
        return
    os.environ.setdefault("SUPPORTQA_MAX_QUEUE_MS", "0")
    os.environ.setdefault("SUPPORTQA_SPEECH_MAX_QUEUE_MS", "0")
    from supportqa import cli, client

    for cls in (client.SupportClient, client.AsyncSupportClient):
        defaults = cls.__init__.__kwdefaults__
        defaults["timeout"] = defaults["timeout"] * SLOWDOWN
    cli.GLOBAL_DEFAULTS["timeout"] *= SLOWDOWN  # the CLI passes its own deadline


_patch()  # at import: -p loads this module before conftest.py and the test modules
_allow_for_emulation()


def pytest_configure(config: pytest.Config) -> None:
    _patch()
    from supportqa_server.runtime import devices

    assert devices.cpu_has_bf16(), "bf16_plugin failed to make cpu_has_bf16() true"
    assert devices.resolve_precision("auto", "cpu") == torch.bfloat16


def pytest_report_header(config: pytest.Config) -> str:
    how = ("native" if _NATIVE else
           f"emulated: queue-wait limits off, default client deadlines x{SLOWDOWN}")
    return f"bf16_plugin: this CPU claims AVX512-BF16; precision auto picks bfloat16 ({how})"
