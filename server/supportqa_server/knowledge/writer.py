"""The one write path: Upsert streams and start-up ingest both validate and write through here."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from supportqa_server.errors import InvalidInput, TooLarge
from supportqa_server.knowledge.articles import ArticleError, guess_format, parse_article
from supportqa_server.knowledge.entries import EntryData, short_id, unfit
from supportqa_server.runtime.settings import KB_NAME_PATTERN

WRITE_BATCH = 64  # entries embedded and written together
MAX_REPORTED = 20  # invalid lines named in one error: enough to fix a file in rounds
MAX_QUESTIONS = 200  # paraphrases per entry
_KB_RE = re.compile(KB_NAME_PATTERN)


def check_kb_name(name: str, where: str = "") -> None:
    """Raises InvalidInput unless name can name a knowledge base."""
    if not _KB_RE.match(name):
        raise InvalidInput(
            f"{where}knowledge base name {name!r} is invalid: use 1-64 of A-Z a-z 0-9 _"
        )


@dataclass(frozen=True)
class Splitting:
    """How texts become passages: the text model's word-piece counter, the most word pieces
    a passage may hold, and the largest article body accepted (bytes of UTF-8)."""

    count_tokens: Callable[[str], int]
    budget: int
    max_body_bytes: int


def with_passages(index: int, e: EntryData, splitting: Splitting) -> EntryData:
    """The entry with its passages: an article's body split along its headings, or an answer
    longer than a passage split at paragraphs and sentences (so no part of it is cut off by
    the text model). Title, url, tags and locale come from a Markdown article's front matter
    where the entry has none. Other entries are returned as they are.

    Raises:
        InvalidInput: the body is too large or cannot be parsed.
    """
    where = f"entry #{index}" + (f" (id {short_id(e.id)})" if e.id else "")
    if e.passages:
        return e  # split already (a file is checked whole before it is written)
    if e.body:
        if (n := len(e.body.encode("utf-8", "surrogatepass"))) > splitting.max_body_bytes:
            raise InvalidInput(f"{where}: its body is {n} bytes; articles may have at most "
                               f"{splitting.max_body_bytes} (SUPPORTQA_MAX_ARTICLE_BYTES)")
        fmt = e.body_format or guess_format("", e.body)
        try:
            article = parse_article(e.body, fmt, count_tokens=splitting.count_tokens,
                                    budget=splitting.budget, title=e.title)
        except ArticleError as err:
            raise InvalidInput(f"{where}: {err}") from err
        meta = article.meta
        tags = meta.get("tags")
        return replace(
            e, body="", body_format=fmt, title=" ".join(article.title.split()),
            passages=_clean(article.passages),
            url=e.url or str(meta.get("url") or ""), locale=e.locale or str(
                meta.get("locale") or ""),
            tags=e.tags or (tuple(str(t) for t in tags) if isinstance(tags, list) else ()),
        )
    if e.answer.strip() and splitting.count_tokens(e.answer) > splitting.budget:
        article = parse_article(e.answer, "text", count_tokens=splitting.count_tokens,
                                budget=splitting.budget, title=e.title)
        return replace(e, title=" ".join(e.title.split()), passages=_clean(article.passages))
    return e


def _clean(passages) -> tuple:
    """Passages whose heading paths hold no empty heading: a row's first line is its path
    ("Title > Heading"), read back on load (EntryData.with_passage_texts)."""
    return tuple(replace(p, headings=tuple(h for h in p.headings if h.strip()))
                 for p in passages)


def validate_entry(index: int, e: EntryData, knowledge_base: str) -> None:
    """Raises InvalidInput naming the entry (its place in the stream) when it cannot be
    written."""
    where = f"entry #{index}" + (f" (id {short_id(e.id)})" if e.id else "")
    check_kb_name(knowledge_base, f"{where}: ")
    if not e.id.strip():
        raise InvalidInput(f"{where} has no id: give every entry a stable unique id")
    if not e.answer.strip() and not e.passages:
        raise InvalidInput(f"{where} has no answer: every entry needs the answer text, or an "
                           "article body")
    if len(e.questions) > MAX_QUESTIONS:
        raise InvalidInput(
            f"{where} has {len(e.questions)} paraphrases; the limit is {MAX_QUESTIONS}"
        )
    if (why := unfit(e)) is not None:
        raise InvalidInput(f"{where}: {why}")


@dataclass
class Rejected:
    """One entry the writer refused: its 0-based place in the stream and why."""

    index: int
    entry_id: str
    message: str
    code: str = "INVALID_ARGUMENT"


@dataclass
class WriteReport:
    """What a stream of entries did. Counts are of distinct (knowledge base, id) pairs: an id
    sent twice is one entry, written as its later version."""

    received: int = 0
    written: int = 0
    replaced: int = 0
    rows: int = 0
    rejected: list[Rejected] = field(default_factory=list)


class EntryWriter:
    """Validates entries as they arrive and writes them in batches of one knowledge base.

    A repeated id writes the batch before it first, so the later version wins. With
    ``dry_run`` nothing is written: every entry is validated and every refusal reported, so a
    caller can check a whole file before its first write.

    Args:
        pipeline: The answering pipeline (its `upsert` and `entry`).
        dry_run: Validate only.
    """

    def __init__(self, pipeline, *, dry_run: bool = False) -> None:
        self.pipeline = pipeline
        self.dry_run = dry_run
        self.report = WriteReport()
        self._batch: list = []
        self._images: list = []
        self._kb = ""
        self._seen: set[tuple[str, str]] = set()
        # Of the batch: entries not written before in this stream, and those of them that
        # replace a stored version. Counted once the batch is written.
        self._new = self._replacing = 0

    async def add(self, knowledge_base: str, entry, images: Sequence = ()) -> None:
        """Takes one entry.

        Raises:
            InvalidInput, TooLarge: the entry cannot be written (not in dry-run mode, where it
                is recorded in ``report.rejected`` instead).
        """
        index = self.report.received
        self.report.received += 1
        try:
            entry = await self.pipeline.with_passages(index, entry)
            validate_entry(index, entry, knowledge_base)
        except (InvalidInput, TooLarge) as e:
            if not self.dry_run:
                raise
            self.report.rejected.append(Rejected(index, entry.id, str(e)))
            return
        if self.dry_run:
            return
        key = (knowledge_base, entry.id)
        if self._batch and (knowledge_base != self._kb or len(self._batch) >= WRITE_BATCH
                            or any(e.id == entry.id for e in self._batch)):
            await self.flush()
        if key not in self._seen:
            self._seen.add(key)
            self._new += 1
            if self.pipeline.entry(knowledge_base, entry.id) is not None:
                self._replacing += 1
        self._kb = knowledge_base
        self._batch.append(entry)
        self._images.append(list(images))

    async def flush(self) -> None:
        """Writes what is batched."""
        if self._batch:
            batch, images = self._batch, self._images
            self._batch, self._images = [], []
            result = await self.pipeline.upsert(self._kb, batch, images)
            self.report.rows += result.rows
            self.report.written += self._new
            self.report.replaced += self._replacing
            self._new = self._replacing = 0


@dataclass(frozen=True)
class FileEntry:
    """One entry of a knowledge-base file and the line it came from."""

    line: int
    knowledge_base: str
    entry: object  # EntryData
    images: tuple = ()


async def check_file(pipeline, path: Path, entries: Sequence[FileEntry]) -> list[FileEntry]:
    """Validates every entry of a file before anything is written; returns them with their
    passages.

    Raises:
        InvalidInput: naming up to MAX_REPORTED problems as "FILE:LINE: what is wrong",
            including an id given twice (both lines named).
    """
    from supportqa.knowledge_file import repeated_ids

    problems: list[str] = []
    split = []
    for i, fe in enumerate(entries):
        try:
            fe = replace(fe, entry=await pipeline.with_passages(i, fe.entry))
            validate_entry(i, fe.entry, fe.knowledge_base)
        except (InvalidInput, TooLarge) as e:
            problems.append(f"{path}:{fe.line}: {e}")
        split.append(fe)
    problems += repeated_ids(path, ((fe.line, fe.knowledge_base, fe.entry.id) for fe in entries))
    if problems:
        more = len(problems) - MAX_REPORTED
        raise InvalidInput(
            f"{path}: {len(problems)} invalid line(s), nothing written:\n"
            + "\n".join(problems[:MAX_REPORTED]) + (f"\n... and {more} more" if more > 0 else "")
        )
    return split


async def write_file(pipeline, path: Path, entries: Sequence[FileEntry]) -> WriteReport:
    """Checks a whole file, then writes it through one EntryWriter: all or nothing as far as
    validation goes (a store failure mid-way keeps what was written before it)."""
    entries = await check_file(pipeline, path, entries)
    writer = EntryWriter(pipeline)
    for fe in entries:
        await writer.add(fe.knowledge_base, fe.entry, fe.images)
    await writer.flush()
    return writer.report
