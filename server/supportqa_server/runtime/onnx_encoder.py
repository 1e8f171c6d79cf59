"""The text encoder through ONNX Runtime: exported from torch once, fused, int8-quantized if
asked, and cached under the cache directory."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from supportqa_server.runtime.encoder import SentenceEncoder
from supportqa_server.runtime.text_models import file_sha256 as _sha256

log = logging.getLogger(__name__)

# Bump when the export, the fusions or the cache layout change, so cached graphs are rebuilt.
CONVERTER_VERSION = 1
OPSET = 17
FINGERPRINT_BYTES = 1 << 20  # 1 MiB hashed at each end of the weights file, with its size
DIGEST_SUFFIX = ".sha256"  # beside each cached graph, written last: no digest, no use


@dataclass(frozen=True)
class Recipe:
    """How the exported float32 graph becomes the one that runs.

    Attributes:
        name: the recipe's name in cache file names and logs.
        fuse: onnxruntime.transformers' BERT fusions (Attention, SkipLayerNormalization,
            BiasGelu), done offline, so int8 covers the fused attention too.
        int8: dynamic int8 quantization of the weights (activations quantized per call).
        per_channel: one weight scale per output column instead of per matrix.
        reduce_range: 7-bit weights; u8 x s8 products cannot overflow int16 on CPUs
            without VNNI (AVX2, AVX512F).
        ops: op types quantized; empty: quantize_dynamic's default set.
        keep_float: a regular expression; the nodes whose names it finds stay float32 (the
            exporter names them `/bert/encoder/layer.3/output/dense/MatMul`, the fusion
            `Attention_3` for layer 3's attention).
    """

    name: str
    fuse: bool = True
    int8: bool = False
    per_channel: bool = False
    reduce_range: bool = False
    ops: tuple[str, ...] = ()
    keep_float: str = ""

    def key(self) -> str:
        """A short digest of every field, so a changed recipe misses the cache."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]


# The recipes SUPPORTQA_TEXT_RUNTIME names (docs/decisions.md: "An int8 text path").
RECIPES: dict[str, Recipe] = {
    "onnx-float32": Recipe("float32"),
    "onnx-int8": Recipe("int8", int8=True, per_channel=True, ops=("MatMul", "Attention")),
}


def model_dir(model: str) -> Path:
    """The local directory of a resolved text model (a path, or a hub id already cached).

    Raises:
        RuntimeError: a hub id that is not in the local HF cache.
    """
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure to find it means the same to the caller
        raise RuntimeError(
            f"text model {model!r} is neither a directory nor in the HF cache: the ONNX "
            "runtime exports from local files only"
        ) from e


def fingerprint(directory: Path) -> str:
    """Hashes config.json, and the size and both ends of the weights file."""
    weights = next((directory / n for n in ("model.safetensors", "pytorch_model.bin")
                    if (directory / n).is_file()), None)
    if weights is None:
        raise RuntimeError(f"{directory}: no model.safetensors or pytorch_model.bin to export")
    size = weights.stat().st_size
    h = hashlib.sha256(f"v{CONVERTER_VERSION}:{size}".encode())
    h.update((directory / "config.json").read_bytes())
    with open(weights, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        f.seek(max(0, size - FINGERPRINT_BYTES))
        h.update(f.read())
    return h.hexdigest()[:16]


def cache_path(model: str, cache_dir: Path, recipe: Recipe) -> Path:
    """Where the graph of ``model`` made by ``recipe`` is cached: keyed by the model's
    files, the recipe and the onnxruntime version (a newer one may fuse differently)."""
    import onnxruntime

    directory = model_dir(model)
    name = directory.name if directory.name != "model" else directory.parent.name
    return (cache_dir / "onnx-text" / f"{name}-{fingerprint(directory)}-"
            f"ort{onnxruntime.__version__}-{recipe.name}-{recipe.key()}.onnx")


# Texts the float32 graph must embed as torch does before it is cached: a padded batch of
# mixed lengths and a lone text (no padding), the two paths a trace could get wrong.
CHECK_TEXTS = (
    ("a card", "how do I reset my card pin when the app says that it is blocked?", "pin"),
    ("my card was stolen",),
)


def export_onnx(model: str, out: Path) -> list[tuple[dict, np.ndarray]]:
    """Exports the model with mean pooling and L2 normalisation inside the graph:
    (input_ids, attention_mask) int64 (N, T) -> vectors float32 (N, H), unit length.

    Returns:
        (inputs, torch's vectors) of CHECK_TEXTS, computed before the export.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    from supportqa_server.runtime.encoder import mean_pool

    directory = model_dir(model)
    # A model of its own: tracing leaves the traced module's masks fixed for later calls.
    # Eager attention: its MatMul-Softmax-MatMul is the pattern onnxruntime fuses into one
    # Attention op; the SDPA path exports as a graph the fusion does not recognise.
    bert = AutoModel.from_pretrained(directory, local_files_only=True,
                                     attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

    pooled = Pooled()
    cases = []
    with torch.inference_mode():
        for texts in CHECK_TEXTS:
            batch = tokenizer(list(texts), padding=True, return_tensors="pt")
            feeds = {k: batch[k].numpy() for k in ("input_ids", "attention_mask")}
            cases.append((feeds, pooled(batch["input_ids"], batch["attention_mask"]).numpy()))
    # Traced on a padded pair: an example without padding would let transformers drop the
    # mask ("all ones"), and the trace would keep that choice for every input.
    example = tokenizer(["a card", "how do I reset my card pin"], padding=True,
                        return_tensors="pt")
    axes = {0: "batch", 1: "tokens"}
    with torch.inference_mode(), warnings.catch_warnings():
        # the tracer's warnings about shapes it fixes: the check after the export covers them
        warnings.simplefilter("ignore")
        torch.onnx.export(
            pooled, (example["input_ids"], example["attention_mask"]), str(out),
            input_names=["input_ids", "attention_mask"], output_names=["vectors"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "vectors": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )
    return cases


def check_graph(path: Path, cases: list[tuple[dict, np.ndarray]]) -> None:
    """Raises RuntimeError unless the graph embeds each case as torch did (cosine 0.9999)."""
    run = session(path).run
    for feeds, expected in cases:
        (got,) = run(["vectors"], feeds)
        worst = float((got * expected).sum(1).min())
        if worst < 0.9999:
            raise RuntimeError(
                f"{path.name}: the exported graph's vectors differ from torch's (cosine "
                f"{worst:.4f}); this transformers version exports the model differently: "
                "set SUPPORTQA_TEXT_RUNTIME=torch"
            )


def _fuse(src: Path, dst: Path, config: dict) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    # opt_level 0: the Python fusions only, no onnxruntime graph passes, so the file holds no
    # layout chosen for this CPU (the cache may outlive the machine's CPU).
    fused = optimize_model(str(src), model_type="bert", opt_level=0, use_gpu=False,
                           num_heads=int(config["num_attention_heads"]),
                           hidden_size=int(config["hidden_size"]))
    fused.save_model_to_file(str(dst))


def _float_nodes(path: Path, pattern: str) -> list[str]:
    """Names of the graph's nodes that ``pattern`` (a regular expression) finds."""
    import onnx

    if not pattern:
        return []
    found = re.compile(pattern).search
    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node
            if found(n.name)]


def build(model: str, target: Path, recipe: Recipe) -> None:
    """Exports, fuses and quantizes into ``target`` (atomically: built in a temporary
    directory beside it, renamed into place, its digest written last)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    config = json.loads((model_dir(model) / "config.json").read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.stem}-", dir=target.parent))
    try:
        graph = work / "export.onnx"
        cases = export_onnx(model, graph)
        if recipe.fuse:
            _fuse(graph, work / "fused.onnx", config)
            graph = work / "fused.onnx"
        check_graph(graph, cases)
        if recipe.int8:
            exclude = _float_nodes(graph, recipe.keep_float)
            quantize_dynamic(
                str(graph), str(work / "int8.onnx"), weight_type=QuantType.QInt8,
                per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                op_types_to_quantize=list(recipe.ops) or None, nodes_to_exclude=exclude,
                # the fused contrib ops (BiasGelu, SkipLayerNormalization) have no ONNX shape
                # inference: their outputs are float32
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
            graph = work / "int8.onnx"
        os.chmod(graph, 0o644)  # mkdtemp's files are private; the cache may be shared
        digest = _sha256(graph)
        os.replace(graph, target)
        (work / "digest").write_text(digest + "\n")
        os.replace(work / "digest", target.with_name(target.name + DIGEST_SUFFIX))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _intact(path: Path) -> bool:
    digest = path.with_name(path.name + DIGEST_SUFFIX)
    try:
        return path.is_file() and digest.read_text().strip() == _sha256(path)
    except OSError:
        return False


def cached_graph(model: str, cache_dir: Path, recipe: Recipe) -> Path:
    """The cached graph for ``model`` and ``recipe``, built first if it is missing or does
    not match its digest (a torn or corrupted file is rebuilt, not loaded)."""
    target = cache_path(model, cache_dir, recipe)
    if _intact(target):
        return target
    if target.exists():
        log.warning("%s does not match its digest: rebuilding it", target)
    log.info("exporting %s to ONNX (%s) into %s", model, recipe.name, target.parent)
    build(model, target, recipe)
    return target


def session(path: Path, threads: int = 0):
    """An onnxruntime CPU session; threads 0: every core this process may use."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep rather than spin: a server's encoder shares the cores with
    # the Milvus search right after it, the gRPC loop and the callers. BANKING77 server on
    # 2 cores (AVX2), the same knowledge base, turns of 8 s: c=32 83.0/85.6 and 89.2/91.7 QPS
    # against 75.9/72.0 and 83.1/77.3 spinning; c=1 55.2 and 62.7 against 45.0 and 45.5.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxTextEncoder(SentenceEncoder):
    """The TextEncoder's contract (mean-pooled, L2-normalised float32 vectors (N, dim)) run
    by onnxruntime on the CPU.

    Args:
        model: as TextEncoder's (text_models.py resolves it).
        runtime: a key of RECIPES: "onnx-int8" or "onnx-float32".
        cache_dir: where graphs are cached (and packaged models extracted).
        threads: onnxruntime intra-op threads; 0: every core.
        recipe: overrides the runtime's recipe (benchmarks try others).
    """

    device = "cpu"

    def __init__(self, model: str = "", runtime: str = "onnx-int8",
                 cache_dir: Path | None = None, threads: int = 0,
                 recipe: Recipe | None = None) -> None:
        from transformers import AutoTokenizer

        from supportqa_server.runtime.settings import DEFAULT_CACHE_DIR
        from supportqa_server.runtime.text_models import resolve_text_model

        if recipe is None and runtime not in RECIPES:
            raise ValueError(f"text runtime {runtime!r} is not one of {', '.join(RECIPES)}")
        self.recipe = recipe or RECIPES[runtime]
        cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        source = resolve_text_model(model, cache_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir(source), local_files_only=True)
        self.path = cached_graph(source, cache_dir, self.recipe)
        try:
            self._session = session(self.path, threads)
        except Exception as e:  # noqa: BLE001 - a graph that matched its digest yet fails
            log.warning("%s failed to load (%s): rebuilding it", self.path, e)
            build(source, self.path, self.recipe)
            self._session = session(self.path, threads)
        self.model_name = source
        self.runtime = runtime if recipe is None else f"onnx-{recipe.name}"
        self.dtype = "int8" if self.recipe.int8 else "float32"  # what the products compute in
        self.dim: int = int(self._session.get_outputs()[0].shape[-1])

    def _vectors(self, batch, n: int) -> np.ndarray:
        feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        (vectors,) = self._session.run(["vectors"], feeds)  # (rows, dim), unit length
        return np.ascontiguousarray(vectors[:n], dtype=np.float32)
