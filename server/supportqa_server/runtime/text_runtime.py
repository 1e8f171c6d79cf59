"""Which runtime runs the text encoder (SUPPORTQA_TEXT_RUNTIME), and the encoder it loads."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx-float32", "onnx-int8")
# Runtimes "auto" may pick on a CPU for the bundled MiniLM: those whose BANKING77 and CLINC150
# accuracy stayed within 0.003 of torch float32's (int8: BANKING77 dev 0.9349 both, CLINC150
# 0.9630 against 0.9640; docs/decisions.md, "The text encoder's runtime"). Other models were
# not measured, so "auto" keeps them on torch.
AUTO_CPU_CANDIDATES = ("torch", "onnx-float32", "onnx-int8")
# What "auto" times on this CPU: one question at a time (a quiet server) and a full batch in
# the server's chunks (a busy one), each weighed by the sentences it holds.
TIMING_SINGLES = 16
TIMING_BATCH = 64
TIMING_TEXTS = (
    "I lost my card", "how do I reset my pin?", "my top up failed",
    "why was my card payment declined at the shop yesterday",
    "How long does a transfer from abroad take to arrive in my account?",
    "can I get a refund for a purchase I did not make",
    "what are the fees for exchanging currencies on the weekend",
    "the app says my identity verification failed, what do I do now?",
)
# Token budgets (padded tokens per forward pass) the CPU tuner tries: 128 is 8 questions of
# 9-16 word pieces (BANKING77's median is 13), 2048 the whole batch of 64 at 32 tokens.
TOKEN_BUDGETS = (128, 256, 512, 1024, 2048)
BUDGET_TOLERANCE = 0.05  # of the fastest budget's time: within it, the smaller budget is kept
BUDGET_ROUNDS = 7  # turns over the budgets; the median of each budget's times is compared


def load_text_encoder(model: str = "", device: str = "cpu", precision: str = "auto",
                      cache_dir: Path | None = None, runtime: str = "auto", threads: int = 0,
                      chunks: Mapping[str, int] | None = None):
    """The text encoder for a runtime: TextEncoder (torch) or OnnxTextEncoder.

    Args:
        model, device, precision, cache_dir: as TextEncoder's.
        runtime: one of RUNTIMES. "auto": torch off the CPU; on the CPU the fastest on this
            machine of AUTO_CPU_CANDIDATES (bundled model only), timed once per CPU, model and
            library versions and remembered under cache_dir.
        threads: intra-op threads of onnxruntime; 0: every core.
        chunks: texts per forward pass within a batch by the encoder's number format
            ("float32", "bfloat16", "int8"), as the server runs its batches; default 16.

    Raises:
        ValueError: an unknown runtime, or an ONNX runtime asked for off the CPU.
    """
    from supportqa_server.runtime.encoder import TextEncoder
    from supportqa_server.runtime.onnx_encoder import OnnxTextEncoder

    if runtime not in RUNTIMES:
        raise ValueError(f"text runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime.startswith("onnx") and device != "cpu":
        raise ValueError(f"text runtime {runtime!r} runs on the CPU only; device is {device!r}:"
                         " set SUPPORTQA_TEXT_RUNTIME=torch or SUPPORTQA_DEVICE=cpu")
    if runtime == "auto":
        if device != "cpu" or model or len(AUTO_CPU_CANDIDATES) == 1:
            return load_text_encoder(model, device, precision, cache_dir, "torch", threads)
        return _fastest(AUTO_CPU_CANDIDATES, model, precision, cache_dir, threads, chunks or {})
    if runtime == "torch":
        return TextEncoder(model, device, precision, cache_dir)
    return OnnxTextEncoder(model, runtime, cache_dir, threads)


def _cached_json(path: Path, measure):
    """The JSON object cached at path, else measure() written there (atomically)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    got = measure()
    _write_json(path, got)
    return got


def _write_json(path: Path, obj) -> None:
    """Writes obj as JSON at path, whole or not at all (another server may read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".json-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def tuned_token_budget(encoder, cache_dir: Path | None = None, threads: int = 0,
                       budgets: tuple[int, ...] = TOKEN_BUDGETS,
                       texts: Sequence[str] = TIMING_TEXTS) -> int:
    """Padded tokens per forward pass at which this encoder embeds a full batch of questions
    fastest on this CPU: TIMING_BATCH of ``texts`` (real questions, so their lengths vary as
    a batch's do) embedded at each of ``budgets`` in turn, BUDGET_ROUNDS times after a
    warm-up (a drift of the machine's speed lands on every budget), the median kept; the
    smallest budget within BUDGET_TOLERANCE of the fastest is chosen (a smaller pass holds a
    question back less). Measured once per CPU, cores, runtime and model, and remembered
    under cache_dir (seconds on a first start).
    """
    from supportqa_server.runtime.settings import DEFAULT_CACHE_DIR

    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    batch = [texts[i % len(texts)] for i in range(TIMING_BATCH)]
    key = json.dumps([_cpu_key(), len(os.sched_getaffinity(0)), threads, encoder.runtime,
                      str(encoder.dtype), encoder.model_name, budgets, batch, _versions()])
    path = (cache_dir / "onnx-text" /
            f"budget-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")

    def measure():
        rounds: dict[int, list[float]] = {b: [] for b in budgets}
        encoder.encode_sorted(batch, TIMING_BATCH, budgets[0])  # warm-up
        for _ in range(BUDGET_ROUNDS):
            for budget in budgets:
                t0 = time.perf_counter()
                encoder.encode_sorted(batch, TIMING_BATCH, budget)
                rounds[budget].append(time.perf_counter() - t0)
        seconds = {str(b): statistics.median(ts) for b, ts in rounds.items()}
        fastest = min(seconds.values())
        chosen = min(int(b) for b, t in seconds.items()
                     if t <= fastest * (1 + BUDGET_TOLERANCE))
        log.info("text encoder token budget %d on this CPU (ms per %d questions: %s)", chosen,
                 TIMING_BATCH, ", ".join(f"{b} {1000 * t:.0f}" for b, t in seconds.items()))
        return {"budget": chosen, "seconds": seconds, "cpu": _cpu_key()[:200]}

    try:
        return int(_cached_json(path, measure)["budget"])
    except (KeyError, TypeError, ValueError):
        path.unlink(missing_ok=True)
        return int(_cached_json(path, measure)["budget"])


def _versions() -> list[str]:
    import onnxruntime
    import torch

    return [torch.__version__, onnxruntime.__version__]


def chunk_of(encoder, chunks: Mapping[str, int]) -> int:
    """Texts per forward pass for this encoder's number format (16 if chunks has none)."""
    return chunks.get(str(encoder.dtype).removeprefix("torch."), 16)


def seconds_for(encoder, chunk: int) -> float:
    """Seconds the encoder takes for TIMING_SINGLES lone questions and one TIMING_BATCH batch
    in chunks of ``chunk`` (the best of 3 rounds, after a warm-up)."""
    texts = [TIMING_TEXTS[i % len(TIMING_TEXTS)] for i in range(TIMING_BATCH)]
    best = float("inf")
    for _ in range(4):  # the first is the warm-up: kernels built, buffers allocated
        t0 = time.perf_counter()
        for i in range(TIMING_SINGLES):
            encoder.encode([texts[i]])
        encoder.encode_sorted(texts, chunk)
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu_key() -> str:
    """This CPU as the kernels see it: model name and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('model name', '')}|{fields.get('flags', fields.get('Features', ''))}"


def _choice_path(cache_dir: Path, candidates: tuple[str, ...], precision: str,
                 threads: int, chunks: Mapping[str, int]) -> Path:
    from supportqa_server.runtime.onnx_encoder import CONVERTER_VERSION, fingerprint, model_dir
    from supportqa_server.runtime.text_models import bundled_text_model

    key = json.dumps([_cpu_key(), len(os.sched_getaffinity(0)), threads, dict(chunks), precision,
                      candidates, *_versions(),
                      CONVERTER_VERSION, fingerprint(model_dir(bundled_text_model()))])
    return cache_dir / "onnx-text" / f"choice-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _fastest(candidates: tuple[str, ...], model: str, precision: str,
             cache_dir: Path | None, threads: int, chunks: Mapping[str, int]):
    from supportqa_server.runtime.settings import DEFAULT_CACHE_DIR

    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    path = _choice_path(cache_dir, candidates, precision, threads, chunks)
    try:
        chosen = json.loads(path.read_text())["runtime"]
    except (OSError, ValueError, KeyError, TypeError):
        chosen = None
    if chosen in candidates:
        log.info("text runtime %s (auto, timed on this CPU before: %s)", chosen, path)
        try:
            return load_text_encoder(model, "cpu", precision, cache_dir, chosen, threads)
        except Exception as e:  # noqa: BLE001 - an ONNX graph that cannot be built here
            if chosen == "torch":
                raise
            log.warning("text runtime %s failed to load (%s): timing the others", chosen, e)
    timings: dict[str, float] = {}
    best, best_s = None, float("inf")
    for name in candidates:
        try:
            encoder = load_text_encoder(model, "cpu", precision, cache_dir, name, threads)
        except Exception as e:  # noqa: BLE001 - auto still serves with what loads
            if name == "torch":
                raise
            log.warning("text runtime %s left out of auto: %s", name, e)
            continue
        timings[name] = seconds_for(encoder, chunk_of(encoder, chunks))
        if timings[name] < best_s:
            best, best_s = encoder, timings[name]
        del encoder
    chosen = min(timings, key=timings.get)
    log.info("text runtime %s (auto): %s", chosen,
             ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in timings.items()))
    _write_json(path, {"runtime": chosen, "seconds": timings, "cpu": _cpu_key()[:200]})
    return best
