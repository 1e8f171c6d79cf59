"""Text encoder throughput and agreement per runtime: torch float32, torch dynamic int8,
onnxruntime float32 and int8 (and bfloat16 where this CPU multiplies it natively).

Every figure is measured in this one run, the encoders in turns (the machines are noisy):
quote the ratios against torch float32.
Usage:
    python benchmarks/bench_encoder.py [--rounds 5] [--seconds 1.5] --out docs/benchmarks/encoder.md
    python benchmarks/bench_encoder.py --encoders onnx-int8,i8-ffn2   # int8 variants
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from supportqa_server.cli import NUMPY_BLAS_THREADS, OMP_SPIN_COUNT

# The threads as supportqa-server sets them, before numpy and torch load: with libgomp's
# default spin a torch encode beside other busy processes fell to a few sentences/s.
os.environ.setdefault("GOMP_SPINCOUNT", OMP_SPIN_COUNT)
os.environ.setdefault("OPENBLAS_NUM_THREADS", NUMPY_BLAS_THREADS)

import numpy as np  # noqa: E402 - after the environment above

ROOT = Path(__file__).resolve().parents[1]
BANKING = ROOT.parent / "shared" / "data" / "text" / "banking77" / "train.csv"
BATCHES = (1, 8, 32)
KEPT = "## Accuracy"  # the output file's section from here on is not this script's
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def variants() -> dict:
    """Int8 recipes tried besides the shipped one (onnx_encoder.RECIPES)."""
    from supportqa_server.runtime.onnx_encoder import Recipe

    ma = ("MatMul", "Attention")
    return {
        "i8-tensor": Recipe("i8-tensor", int8=True, ops=ma),
        "i8-tensor-rr": Recipe("i8-tensor-rr", int8=True, reduce_range=True, ops=ma),
        "i8-channel": Recipe("i8-channel", int8=True, per_channel=True, ops=ma),
        "i8-matmul": Recipe("i8-matmul", int8=True, per_channel=True, ops=("MatMul",)),
        "i8-all": Recipe("i8-all", int8=True, per_channel=True),
        "i8-ends": Recipe("i8-ends", int8=True, per_channel=True, ops=ma,
                          keep_float=r"/layer\.(0|5)/|^Attention_(0|5)$"),
        "i8-ffn2": Recipe("i8-ffn2", int8=True, per_channel=True, ops=ma,
                          keep_float=r"layer\.\d+/output/dense/MatMul$"),
        "i8-nofuse": Recipe("i8-nofuse", fuse=False, int8=True, per_channel=True,
                            ops=("MatMul",)),
    }


def make_encoder(name: str, model: str = "", cache_dir: Path | None = None):
    """An encoder by benchmark name: torch-float32, torch-bfloat16, torch-int8 (torch's
    dynamic quantization of every nn.Linear, one scale per matrix; torch-int8-channel: per
    output channel), a SUPPORTQA_TEXT_RUNTIME value, or a variant."""
    from supportqa_server.runtime.encoder import TextEncoder
    from supportqa_server.runtime.onnx_encoder import RECIPES, OnnxTextEncoder

    if name in ("torch-float32", "torch-bfloat16"):
        return TextEncoder(model, precision=name.removeprefix("torch-"))
    if name in ("torch-int8", "torch-int8-channel"):
        import torch
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        enc = TextEncoder(model, precision="float32")
        spec = ({torch.nn.Linear: per_channel_dynamic_qconfig} if name.endswith("channel")
                else {torch.nn.Linear})
        enc._model = quantize_dynamic(enc._model, spec, dtype=torch.qint8)
        enc.dtype = "int8"
        return enc
    if name in RECIPES:
        return OnnxTextEncoder(model, name, cache_dir)
    found = variants().get(name)
    if found is None:
        raise SystemExit(f"unknown encoder {name!r}: torch-float32, torch-bfloat16, "
                         f"torch-int8, torch-int8-channel, {', '.join(RECIPES)}, "
                         f"{', '.join(variants())}")
    return OnnxTextEncoder(model, cache_dir=cache_dir, recipe=found)


def cpu_model() -> tuple[str, str]:
    """(model name, family and model numbers from /proc/cpuinfo; the vector extensions it
    lists of FLAGS)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    flags = set(fields.get("flags", "").split())
    return name, " ".join(f for f in FLAGS if f in flags) or "none of " + ", ".join(FLAGS)


def throughput(enc, texts: list[str], batch: int, seconds: float) -> float:
    """Sentences/s of encode() on consecutive batches of real texts for about ``seconds``."""
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        part = texts[i : i + batch]
        enc.encode(part)
        n += len(part)
        i = (i + batch) % (len(texts) - batch)
    return n / (time.perf_counter() - t0)


def chunked(enc, texts: list[str], chunk: int, seconds: float) -> float:
    """Sentences/s of 64-text batches in length-sorted chunks (as the server runs a batch)."""
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        enc.encode_sorted(texts[i : i + 64], chunk)
        n += 64
        i = (i + 64) % (len(texts) - 64)
    return n / (time.perf_counter() - t0)


def main() -> int:
    import torch
    from supportqa_server.runtime.devices import cpu_has_bf16

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--encoders", default="",
                    help="comma-separated; default torch-float32, [torch-bfloat16,] "
                         "torch-int8, onnx-float32, onnx-int8")
    ap.add_argument("--rounds", type=int, default=5, help="turns over the encoders")
    ap.add_argument("--seconds", type=float, default=1.5, help="per batch size per turn")
    ap.add_argument("--chunks", default="8,16,32,64", help="chunk sizes of a 64-text batch")
    ap.add_argument("--agree", type=int, default=1000, help="texts for the cosines")
    ap.add_argument("--cache-dir", default="", help="ONNX graphs; default a temporary one")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    names = [n for n in args.encoders.split(",") if n] or [
        "torch-float32", *(["torch-bfloat16"] if cpu_has_bf16() else []), "torch-int8",
        "torch-int8-channel", "onnx-float32", "onnx-int8"]
    if names[0] != "torch-float32":
        names.insert(0, "torch-float32")
    chunks = [int(c) for c in args.chunks.split(",") if c]
    torch.set_num_threads(os.cpu_count() or 1)
    with BANKING.open(newline="", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    texts = [texts[i] for i in np.random.default_rng(7).permutation(len(texts))]
    cpu, flags = cpu_model()
    print(f"CPU: {cpu} ({flags}); {os.cpu_count()} cores", flush=True)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache_dir) if args.cache_dir else Path(tmp)
        encoders, load_s = {}, {}
        for name in names:
            t0 = time.perf_counter()
            encoders[name] = make_encoder(name, cache_dir=cache)
            load_s[name] = time.perf_counter() - t0
            print(f"{name}: loaded in {load_s[name]:.1f} s", flush=True)
        agree = texts[: args.agree]
        vecs = {n: e.encode_sorted(agree, 16) for n, e in encoders.items()}
        ref = vecs["torch-float32"]
        cos = {n: (v * ref).sum(1) for n, v in vecs.items()}
        # dynamic int8 scales each product's activations over the whole batch: a text's
        # vector depends on the texts beside it (float32 does not, to 1e-5)
        alone = {n: (np.concatenate([e.encode([t]) for t in agree[:200]]) * vecs[n][:200]).sum(1)
                 for n, e in encoders.items()}
        for e in encoders.values():  # warm-up of every shape the turns use
            for b in BATCHES:
                e.encode(texts[:b])
        sps: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for name, e in encoders.items():
                for b in BATCHES:
                    sps.setdefault((name, f"b{b}"), []).append(
                        throughput(e, texts, b, args.seconds))
                for c in chunks:
                    sps.setdefault((name, f"c{c}"), []).append(
                        chunked(e, texts, c, args.seconds))
            print(f"round {r + 1}: " + ", ".join(
                f"{n} b1 {sps[(n, 'b1')][-1]:.0f}/s b32 {sps[(n, 'b32')][-1]:.0f}/s"
                for n in encoders), flush=True)
    med = {k: statistics.median(v) for k, v in sps.items()}

    def row(name: str, keys: list[str]) -> str:
        cells = [f"{med[(name, k)]:.0f} ({med[(name, k)] / med[('torch-float32', k)]:.2f}x)"
                 for k in keys]
        return f"| {name} | " + " | ".join(cells) + " |"

    lines = [
        "# Text encoder runtimes",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"CPU: {cpu} ({flags}); {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {ort_version()}; "
        f"date {time.strftime('%Y-%m-%d %H:%M')}  ",
        f"Load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after: on "
        f"{os.cpu_count()} cores, anything above {os.cpu_count()} means other processes "
        "shared them.  ",
        f"Texts: BANKING77 train questions, shuffled; {args.rounds} turns over the encoders, "
        f"{args.seconds:g} s per point each turn; medians; in brackets the ratio to torch "
        "float32 in the same run.",
        "",
        "## Sentences/s by batch size (one forward pass per batch)",
        "",
        "| encoder | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
        "|---|" + "---|" * len(BATCHES),
        *[row(n, [f"b{b}" for b in BATCHES]) for n in encoders],
        "",
        "## Sentences/s of 64-text batches, by chunk (length-sorted forward passes)",
        "",
        "| encoder | " + " | ".join(f"chunk {c}" for c in chunks) + " |",
        "|---|" + "---|" * len(chunks),
        *[row(n, [f"c{c}" for c in chunks]) for n in encoders],
        "",
        f"## Agreement with torch float32 ({len(agree)} texts)",
        "",
        "Cosine of each text's vector to torch float32's (both in length-sorted batches of "
        "16), and of a text encoded alone to the same encoder's vector of it in such a batch "
        "(first 200 texts).",
        "",
        "| encoder | cosine mean | cosine min | cosine p1 | alone/batched mean | alone/batched "
        "min | load (s) |",
        "|---|---|---|---|---|---|---|",
        *[f"| {n} | {c.mean():.4f} | {c.min():.4f} | {np.percentile(c, 1):.4f} | "
          f"{alone[n].mean():.4f} | {alone[n].min():.4f} | {load_s[n]:.1f} |"
          for n, c in cos.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        # the accuracy section is written by hand from tune_rank.py's runs: kept as it is
        kept = out.read_text().partition("\n" + KEPT)[2] if out.exists() else ""
        out.write_text(text + ("\n" + KEPT + kept if kept else ""))
    return 0


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    sys.exit(main())
