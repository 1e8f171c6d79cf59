"""The text encoder through onnxruntime: the bundled MiniLM exported, quantized to int8 and
cached; its vectors against torch's; the cache reused and rebuilt; which runtime auto picks."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from pydantic import ValidationError
from supportqa_server.runtime import onnx_encoder, text_runtime
from supportqa_server.runtime.settings import Settings

PAIRS = [  # (question, its paraphrase): each question's nearest paraphrase is its own
    ("How do I reset my PIN?", "I forgot the PIN of my card"),
    ("My card was stolen", "someone took my bank card from my bag"),
    ("How long does a transfer take?", "when will the money I sent arrive?"),
    ("Can I get a refund?", "I want my money back for this purchase"),
    ("Why was my payment declined?", "the shop rejected my card"),
    ("How do I change my address?", "I moved house and need to update my details"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def int8(cache):
    from supportqa_server.runtime.onnx_encoder import OnnxTextEncoder

    return OnnxTextEncoder(runtime="onnx-int8", cache_dir=cache)


@pytest.fixture(scope="module")
def torch32():
    from supportqa_server.runtime.encoder import TextEncoder

    return TextEncoder(precision="float32")


@pytest.fixture(scope="module")
def banking(shared_data):
    with open(shared_data / "text" / "banking77" / "train.csv", newline="") as f:
        return [r["text"] for r in csv.DictReader(f)][:400]


@pytest.mark.slow
def test_int8_keeps_the_encoder_contract(int8, torch32):
    texts = ["card lost", "how do I top up my account with a bank transfer from abroad?", "pin"]
    vecs = int8.encode(texts)
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert int8.dim == torch32.dim == 384
    assert int8.dtype == "int8" and int8.runtime == "onnx-int8"
    assert int8.model_name == torch32.model_name  # the same model, another runtime
    assert int8.encode([]).shape == (0, 384)
    assert int8.count_tokens("my card was stolen") == torch32.count_tokens("my card was stolen")
    # Dynamic int8 scales each product's activations over the whole batch, so a text's
    # vector moves a little with the texts beside it (0.990 least here; float32: 1e-5).
    alone = np.concatenate([int8.encode([t]) for t in texts])
    assert float((alone * vecs).sum(1).min()) > 0.98
    np.testing.assert_array_equal(int8.encode(texts[:1]), alone[:1])  # deterministic
    assert int8.encode_sorted(texts * 7, batch_size=4).shape == (21, 384)
    long = int8.encode(["word " * 1000])  # truncated at MAX_TOKENS, as torch's
    assert long.shape == (1, 384)


@pytest.mark.slow
def test_int8_vectors_stay_close_to_torch(int8, torch32, banking):
    """On 500 BANKING77 questions int8 sat at cosine 0.993 mean, 0.987 least, of float32's
    (docs/benchmarks/encoder.md); the bounds leave a margin for other CPUs' kernels."""
    ref, got = torch32.encode_sorted(banking, 16), int8.encode_sorted(banking, 16)
    cos = (ref * got).sum(1)
    assert cos.mean() > 0.985 and cos.min() > 0.96, (cos.mean(), cos.min())
    # the nearest other question of each question is mostly the same one
    same = ((got @ got.T - 2 * np.eye(len(got))).argmax(1)
            == (ref @ ref.T - 2 * np.eye(len(ref))).argmax(1)).mean()
    assert same > 0.85


@pytest.mark.slow
def test_int8_ranks_paraphrases_as_torch_does(int8, torch32):
    questions, paraphrases = [q for q, _ in PAIRS], [p for _, p in PAIRS]
    sims = {}
    for name, enc in (("torch", torch32), ("int8", int8)):
        sims[name] = enc.encode(questions) @ enc.encode(paraphrases).T  # (6, 6) cosines
        assert list(sims[name].argmax(1)) == list(range(len(PAIRS))), name
    np.testing.assert_allclose(sims["int8"], sims["torch"], atol=0.05)


@pytest.mark.slow
def test_float32_graph_matches_torch(cache, torch32, banking):
    from supportqa_server.runtime.onnx_encoder import OnnxTextEncoder

    f32 = OnnxTextEncoder(runtime="onnx-float32", cache_dir=cache)
    assert f32.dtype == "float32"
    cos = (f32.encode_sorted(banking, 16) * torch32.encode_sorted(banking, 16)).sum(1)
    assert cos.min() > 0.9999
    # a graph whose vectors are not torch's is refused before it is cached
    feeds = {k: v.astype(np.int64) for k, v in f32._tokenizer(
        ["my card"], return_tensors="np").items() if k in ("input_ids", "attention_mask")}
    onnx_encoder.check_graph(f32.path, [(feeds, torch32.encode(["my card"]))])
    with pytest.raises(RuntimeError, match="differ from torch's"):
        onnx_encoder.check_graph(f32.path, [(feeds, torch32.encode(["a refund"]))])


@pytest.mark.slow
def test_the_cached_graph_is_reused(int8, cache, monkeypatch):
    from supportqa_server.runtime.onnx_encoder import DIGEST_SUFFIX, OnnxTextEncoder

    assert int8.path.parent == cache / "onnx-text"
    assert int8.path.with_name(int8.path.name + DIGEST_SUFFIX).is_file()
    assert not [p for p in int8.path.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    before = int8.path.stat().st_mtime_ns

    def no_export(*_):
        raise AssertionError("exported again although the cache held the graph")

    monkeypatch.setattr(onnx_encoder, "export_onnx", no_export)
    again = OnnxTextEncoder(runtime="onnx-int8", cache_dir=cache)
    assert again.path == int8.path and again.path.stat().st_mtime_ns == before
    np.testing.assert_array_equal(again.encode(["my card"]), int8.encode(["my card"]))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_cache_is_rebuilt(int8, cache, tmp_path, damage):
    """A graph that does not match its digest (torn, flipped, or without a digest) is
    rebuilt; one that matches its digest and still fails to load is rebuilt too."""
    from supportqa_server.runtime.onnx_encoder import DIGEST_SUFFIX, OnnxTextEncoder

    own = tmp_path / "cache"
    shutil.copytree(cache, own)
    path = own / "onnx-text" / int8.path.name
    digest = path.with_name(path.name + DIGEST_SUFFIX)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 3])
    else:
        path.write_bytes(b"not an onnx graph")
        digest.write_text(onnx_encoder._sha256(path) + "\n")
    rebuilt = OnnxTextEncoder(runtime="onnx-int8", cache_dir=own)
    assert rebuilt.path == path and path.stat().st_size == len(data)
    assert digest.read_text().strip() == onnx_encoder._sha256(path)
    np.testing.assert_allclose(rebuilt.encode(["my card"]), int8.encode(["my card"]), atol=1e-6)


def test_runtime_setting_is_checked(monkeypatch):
    monkeypatch.setenv("SUPPORTQA_TEXT_RUNTIME", "tensorrt")
    with pytest.raises(ValidationError, match="text_runtime"):
        Settings()
    monkeypatch.setenv("SUPPORTQA_TEXT_RUNTIME", "onnx-int8")
    assert Settings().text_runtime == "onnx-int8"
    assert Settings.model_fields["text_runtime"].default == "auto"
    with pytest.raises(ValueError, match="runs on the CPU only"):
        text_runtime.load_text_encoder(device="cuda:0", runtime="onnx-int8")
    with pytest.raises(ValueError, match="is not one of"):
        text_runtime.load_text_encoder(runtime="tensorrt")


class _Fake:
    def __init__(self, runtime: str) -> None:
        self.runtime, self.dtype = runtime, "float32"


def test_auto_times_the_candidates_once_per_cpu(monkeypatch, tmp_path):
    """auto on a CPU loads each candidate, keeps the faster on this machine, and remembers
    the choice under the cache directory; off the CPU, or for another model, torch."""
    loaded, timed = [], []

    def fake_load(model="", device="cpu", precision="auto", cache_dir=None, runtime="auto",
                  threads=0, chunks=None):
        if runtime == "auto":
            return real_load(model, device, precision, cache_dir, runtime, threads, chunks)
        loaded.append(runtime)
        return _Fake(runtime)

    real_load = text_runtime.load_text_encoder
    monkeypatch.setattr(text_runtime, "load_text_encoder", fake_load)
    monkeypatch.setattr(text_runtime, "seconds_for", lambda enc, chunk: timed.append(
        enc.runtime) or {"torch": 2.0, "onnx-float32": 1.0, "onnx-int8": 1.5}[enc.runtime])
    chosen = fake_load(cache_dir=tmp_path, runtime="auto")
    assert chosen.runtime == "onnx-float32"  # the fastest here, whatever the others' merits
    assert sorted(timed) == ["onnx-float32", "onnx-int8", "torch"]
    assert len(list((tmp_path / "onnx-text").glob("choice-*.json"))) == 1
    loaded.clear(), timed.clear()
    assert fake_load(cache_dir=tmp_path, runtime="auto").runtime == "onnx-float32"
    assert loaded == ["onnx-float32"] and timed == []  # remembered, not timed again
    loaded.clear()
    assert fake_load(model="/some/model", cache_dir=tmp_path).runtime == "torch"
    assert fake_load(device="cuda:0", cache_dir=tmp_path).runtime == "torch"
    assert timed == []


def test_auto_serves_with_what_loads(monkeypatch, tmp_path):
    """An ONNX graph that cannot be built here (a newer transformers, no onnx) leaves auto
    with the other runtimes, not a server that does not start."""
    real_load = text_runtime.load_text_encoder

    def fake_load(model="", device="cpu", precision="auto", cache_dir=None, runtime="auto",
                  threads=0, chunks=None):
        if runtime == "auto":
            return real_load(model, device, precision, cache_dir, runtime, threads, chunks)
        if runtime.startswith("onnx"):
            raise RuntimeError("the exported graph's vectors differ from torch's")
        return _Fake(runtime)

    monkeypatch.setattr(text_runtime, "load_text_encoder", fake_load)
    monkeypatch.setattr(text_runtime, "seconds_for", lambda enc, chunk: 1.0)
    assert fake_load(cache_dir=tmp_path).runtime == "torch"
    (choice,) = (tmp_path / "onnx-text").glob("choice-*.json")
    choice.write_text('{"runtime": "onnx-int8"}')  # remembered, and now failing
    assert fake_load(cache_dir=tmp_path).runtime == "torch"


def test_batches_cut_by_token_budget_hold_whole_passes_in_length_order():
    from supportqa_server.runtime.encoder import batches_by_length, padded_rows

    lengths = [5, 40, 9, 9, 12, 100, 7, 16, 8, 30]
    for budget in (0, 16, 64, 128, 1024):
        passes = batches_by_length(lengths, batch_size=4, token_budget=budget)
        assert sorted(i for p in passes for i in p) == list(range(len(lengths)))  # each once
        flat = [lengths[i] for p in passes for i in p]
        assert flat == sorted(flat)  # shortest first: passes pad least
        for p in passes:
            assert len(p) <= 4
            padded = padded_rows(len(p)) * -(-max(lengths[i] for i in p) // 8) * 8
            assert budget == 0 or len(p) == 1 or padded <= budget
    # A text longer than the budget still goes, alone; a small budget means more passes.
    assert [5] in batches_by_length(lengths, 4, 16)
    assert len(batches_by_length(lengths, 64, 64)) > len(batches_by_length(lengths, 64, 1024))


@pytest.mark.slow
def test_token_budget_batching_gives_the_same_vectors(int8, torch32, banking):
    """Cutting by tokens changes which texts share a pass, not what a text means (int8's
    activations are quantized per pass, so its rows move a little with their pass mates)."""
    for enc, atol in ((torch32, 1e-4), (int8, 0.03)):
        fixed = enc.encode_sorted(banking[:96], 16)
        budgeted = enc.encode_sorted(banking[:96], 64, 256)
        assert budgeted.shape == fixed.shape
        assert float((fixed * budgeted).sum(1).min()) > 1 - atol


def test_the_token_budget_is_measured_once_per_cpu_and_kept(int8, tmp_path, monkeypatch):
    calls = []
    real = int8.encode_sorted

    def timed(texts, batch_size=64, token_budget=0):
        calls.append(token_budget)
        return real(texts, batch_size, token_budget)

    monkeypatch.setattr(int8, "encode_sorted", timed)
    budget = text_runtime.tuned_token_budget(int8, tmp_path, budgets=(128, 512))
    assert budget in (128, 512) and set(calls) == {128, 512}
    (cached,) = (tmp_path / "onnx-text").glob("budget-*.json")
    assert cached.read_text().count('"seconds"') == 1
    calls.clear()
    assert text_runtime.tuned_token_budget(int8, tmp_path, budgets=(128, 512)) == budget
    assert calls == []  # read back, not timed again
    cached.write_text("{not json")  # a damaged cache is measured again
    assert text_runtime.tuned_token_budget(int8, tmp_path, budgets=(128, 512)) == budget or calls
    assert calls


def test_the_tuner_keeps_the_smallest_budget_near_the_fastest(tmp_path, monkeypatch):
    """The choice rule, on an encoder whose cost per budget is known, on a clock it advances
    (a stand-in: the rule is what is tested, not onnxruntime's speed)."""
    cost_s = {64: 0.030, 128: 0.0102, 256: 0.010, 512: 0.014}  # 128 within 2% of the fastest
    clock = [0.0]
    monkeypatch.setattr(text_runtime.time, "perf_counter", lambda: clock[0])

    class Paced:
        runtime, dtype, model_name = "paced", "float32", "paced"

        def encode_sorted(self, texts, batch_size=64, token_budget=0):
            clock[0] += cost_s[token_budget]

    assert text_runtime.tuned_token_budget(Paced(), tmp_path, budgets=tuple(cost_s)) == 128
    cost_s[128] = 0.010 * (1 + 2 * text_runtime.BUDGET_TOLERANCE)  # too slow: 256 is kept
    assert text_runtime.tuned_token_budget(Paced(), tmp_path / "b", budgets=tuple(cost_s)) == 256
