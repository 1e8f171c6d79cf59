"""Reads the JSON Lines knowledge-base format (knowledge/README.md) into Entry messages."""

from __future__ import annotations

import base64
import json
import mimetypes
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from .v1 import supportqa_pb2 as pb

_LIST_FIELDS = ("questions", "tags")
_TEXT_FIELDS = ("knowledge_base", "id", "title", "answer", "locale", "url")


class KnowledgeFileError(ValueError):
    """A line of a knowledge-base file is not a valid entry."""


def entry_from_dict(d: dict, *, base_dir: Path | None = None, where: str = "entry") -> pb.Entry:
    """Builds an Entry from one parsed JSON object of the file format."""
    if not isinstance(d, dict):
        raise KnowledgeFileError(f"{where}: expected a JSON object, got {type(d).__name__}")
    unknown = set(d) - set(_LIST_FIELDS) - set(_TEXT_FIELDS) - {"images", "updated_at"}
    if unknown:
        raise KnowledgeFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    e = pb.Entry()
    for k in _TEXT_FIELDS:
        v = d.get(k, "")
        if not isinstance(v, str):
            raise KnowledgeFileError(f"{where}: {k} must be a string")
        setattr(e, k, v)
    for k in _LIST_FIELDS:
        v = d.get(k, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise KnowledgeFileError(f"{where}: {k} must be a list of strings")
        getattr(e, k).extend(v)
    for img in d.get("images", []):
        if not isinstance(img, dict):
            raise KnowledgeFileError(f"{where}: each image is an object with path or data_base64")
        if "path" in img:
            path = (base_dir or Path.cwd()) / img["path"]
            try:
                data = path.read_bytes()
            except OSError as err:
                raise KnowledgeFileError(f"{where}: cannot read image {path}: {err}") from err
            mime = img.get("mime_type") or mimetypes.guess_type(path.name)[0] or ""
        elif "data_base64" in img:
            data = base64.b64decode(img["data_base64"])
            mime = img.get("mime_type", "")
        else:
            raise KnowledgeFileError(f"{where}: an image needs path or data_base64")
        e.images.append(pb.Image(data=data, mime_type=mime))
    if d.get("updated_at"):
        try:
            ts = datetime.fromisoformat(d["updated_at"].replace("Z", "+00:00"))
        except (ValueError, AttributeError) as err:
            raise KnowledgeFileError(f"{where}: updated_at must be RFC 3339") from err
        e.updated_at.FromDatetime(ts)
    return e


def read_entries(path: str | Path) -> Iterator[pb.Entry]:
    """Yields the entries of a JSONL file; blank lines and lines starting with # are skipped.

    Raises:
        KnowledgeFileError: naming the line that is not a valid entry.
    """
    for _, entry in read_numbered(path):
        yield entry


def read_numbered(path: str | Path) -> Iterator[tuple[int, pb.Entry]]:
    """Like read_entries, with each entry's line number (1-based)."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as err:
                raise KnowledgeFileError(f"{path}:{n}: not valid JSON ({err.msg})") from err
            yield n, entry_from_dict(d, base_dir=path.parent, where=f"{path}:{n}")


def repeated_ids(path: str | Path, entries: Iterable[tuple[int, str, str]]) -> list[str]:
    """"FILE:LINE: ..." for each entry whose (knowledge base, id) an earlier line already
    used; ``entries`` are (line, knowledge base, id)."""
    first: dict[tuple[str, str], int] = {}
    out = []
    for line, kb, entry_id in entries:
        key = (kb or "default", entry_id)
        if key in first:
            out.append(f"{path}:{line}: id {entry_id!r} is already used on line {first[key]}: "
                       "give every entry its own id")
        else:
            first[key] = line
    return out
