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
_TEXT_FIELDS = ("knowledge_base", "id", "title", "answer", "locale", "url", "body")
# Article files a folder is read for, and the markup each suffix means (Entry.body_format).
ARTICLE_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".html": "html",
                    ".htm": "html", ".txt": "text"}


class KnowledgeFileError(ValueError):
    """A line of a knowledge-base file is not a valid entry."""


def entry_from_dict(d: dict, *, base_dir: Path | None = None, where: str = "entry") -> pb.Entry:
    """Builds an Entry from one parsed JSON object of the file format."""
    if not isinstance(d, dict):
        raise KnowledgeFileError(f"{where}: expected a JSON object, got {type(d).__name__}")
    unknown = (set(d) - set(_LIST_FIELDS) - set(_TEXT_FIELDS)
               - {"images", "updated_at", "body_format"})
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
    fmt = d.get("body_format", "")
    if fmt:
        if fmt not in set(ARTICLE_SUFFIXES.values()):
            raise KnowledgeFileError(f"{where}: body_format must be markdown, html or text")
        e.body_format = pb.BodyFormat.Value("BODY_FORMAT_" + fmt.upper())
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


def read_folder(folder: str | Path) -> Iterator[tuple[Path, pb.Entry]]:
    """One article entry per Markdown, HTML or text file under a folder (recursively, sorted;
    hidden files and folders skipped): id = its path relative to the folder ("billing/
    refunds.md"), body = its text, body_format from its suffix. The server takes the title
    from the front matter or the first heading, and splits the body into passages.

    Raises:
        KnowledgeFileError: a file is not UTF-8 text.
    """
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        fmt = ARTICLE_SUFFIXES.get(path.suffix.lower())
        if fmt is None or not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        try:
            body = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise KnowledgeFileError(f"{path}: not UTF-8 text (byte {err.start})") from err
        yield path, pb.Entry(id=rel.as_posix(), body=body,
                             body_format=pb.BodyFormat.Value("BODY_FORMAT_" + fmt.upper()))


def is_article_id(entry_id: str) -> bool:
    """Whether an id is an article file's path (as read_folder makes them): what
    `supportqa ingest FOLDER --prune` may delete when the file is gone."""
    return Path(entry_id).suffix.lower() in ARTICLE_SUFFIXES


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
