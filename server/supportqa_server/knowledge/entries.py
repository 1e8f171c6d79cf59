"""An entry as the server keeps it, its limits, and the keys under which callers' values reach
Milvus (never as expression text)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

from supportqa_server.knowledge.articles import Passage

MAX_TEXT_BYTES = 8192  # VARCHAR capacity of one searchable text, in bytes
MAX_DOC_BYTES = 65535  # VARCHAR capacity of one entry's JSON
MAX_ID_BYTES = 256  # of an entry id, UTF-8 (stored in the entry's JSON; Milvus sees its key)
MAX_LOCALE_BYTES = 32
MAX_TAGS_BYTES = 2048  # an entry's tags together, as "|a|b|" in UTF-8
MAX_TAGS = 100  # tags per entry: their keys, 17 bytes each, fill the tags field
# Tags one question may filter on. Each is one `like` in the filter, and Milvus Lite 2.5 fails
# a search whose filter ORs more than 50 of them ("unsupported expr proto node").
MAX_FILTER_TAGS = 32
KEY_HEX = 32  # hex digits of an entry key: 128 bits of SHA-256
TAG_KEY_HEX = 16  # of a tag or locale key; a filter's hits are checked against the entry too
_KEY_RE = re.compile(r"[0-9a-f]*")
# An answer of more than EXCERPT_SENTENCES sentences is also searched in excerpts of that many
# sentences, back to back: a question is often about one part of an answer, and a vector of
# the whole blurs it. StackFAQ, answer text alone, 1,249 rephrasings (offline, MiniLM): 0.789
# accuracy@1 with the answer row only, 0.829 with 3-sentence excerpts beside it (the best one
# counted once, answering/rank.py); 0.849 counted in the mean as rows, but then title +
# answer entries fell from 0.929 to 0.908. Windows of 2 sentences: 0.824.
EXCERPT_SENTENCES = 3
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """A text's sentences: split after ".", "?" or "!" and the spaces that follow."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def excerpts(text: str) -> list[str]:
    """A long answer's excerpts of EXCERPT_SENTENCES sentences; [] for a short one."""
    sentences = split_sentences(text)
    if len(sentences) <= EXCERPT_SENTENCES:
        return []
    return [" ".join(sentences[i : i + EXCERPT_SENTENCES])
            for i in range(0, len(sentences), EXCERPT_SENTENCES)]


def key_of(value: str, digits: int = KEY_HEX) -> str:
    """The store's key for a caller's value (an entry id, a tag, a locale): hex digits of its
    SHA-256, the only form in which the value reaches Milvus expressions and primary keys."""
    return hashlib.sha256(value.encode()).hexdigest()[:digits]


def literal(key: str, template: str = "{}") -> str:
    """A key as a Milvus expression string (``template`` around it, e.g. a like pattern).
    Every value an expression compares goes through here, and only keys (hex digits) pass,
    so no caller's text is ever parsed by Milvus."""
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"not a store key: {key[:40]!r}")
    return '"' + template.format(key) + '"'


def row_pk(key: str, version: int, index: int) -> str:
    return f"{key}.{version}.{index}"


@dataclass(frozen=True)
class EntryData:
    """One knowledge-base entry as the server keeps it."""

    id: str
    answer: str
    title: str = ""
    questions: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    locale: str = ""
    url: str = ""
    updated_at: float = 0.0  # seconds since the epoch; 0 when the caller gave none
    image_count: int = 0
    see_rows: int = 0  # rows in the CLIP space: its images, then its texts (0 when CLIP is off)
    # An article's passages (knowledge/articles.py), or a long answer's: each one row. Their
    # texts live in the rows, not in the stored JSON (an article may be megabytes); the store
    # reads them back (layout.passage_texts).
    passages: tuple[Passage, ...] = ()
    # The article as sent, and its format ("" guesses): split into passages on write, then
    # dropped (never stored).
    body: str = field(default="", repr=False, compare=False)
    body_format: str = ""

    def texts(self) -> list[tuple[str, str]]:
        """(kind, text) of every searchable text in row order: title, paraphrases, answer and
        its excerpts (duplicates removed; the answer only when it was not split into
        passages), then one per passage, its heading path before its text."""
        return self._texts

    @functools.cached_property
    def _texts(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        answer = [] if self.passages else [("answer", self.answer)] + [
            ("excerpt", x) for x in excerpts(self.answer)]
        for kind, text in [("title", self.title)] + [("question", q) for q in self.questions] + (
            answer
        ):
            t = text.strip()
            if t and t.casefold() not in seen:
                seen.add(t.casefold())
                out.append((kind, t))
        return out + [("passage", self.passage_prefix(p) + p.text) for p in self.passages]

    def passage_prefix(self, p: Passage) -> str:
        """What a passage's row holds before its text: the article's title and the passage's
        headings, so that both are searched with it ("Title > Heading > Sub" and a line
        break; empty when there are none)."""
        path = " > ".join(h for h in (self.title.strip(), *p.headings) if h)
        return path + "\n" if path else ""

    def passage_of(self, row_text: str) -> Passage | None:
        """The passage whose row holds ``row_text``; None for a title, paraphrase or answer."""
        return self._passage_rows.get(row_text)

    @functools.cached_property
    def _passage_rows(self) -> dict[str, Passage]:
        rows = self.texts()[self.first_passage_row:]
        return {text: p for (_, text), p in zip(rows, self.passages, strict=True)}

    @property
    def first_passage_row(self) -> int:
        """Row index of the first passage (the rows before are title, paraphrases, answer)."""
        return len(self.texts()) - len(self.passages)

    def with_passage_texts(self, rows: dict[int, str]) -> EntryData:
        """This entry with its passages' headings and texts read back from their rows (row
        index -> row text): the stored JSON keeps only how many headings each has."""
        first, title = self.first_passage_row, self.title.strip()
        out = []
        for i, p in enumerate(self.passages):
            row, n = rows.get(first + i, ""), len(p.headings)
            headings: tuple[str, ...] = ()
            if title or n:  # the row starts with its path line: passage_prefix
                path, _, row = row.partition("\n")
                path = path.removeprefix(title).removeprefix(" > ") if title else path
                headings = tuple(path.split(" > ", n - 1)) if n else ()
            out.append(replace(p, headings=headings, text=row))
        return replace(self, passages=tuple(out))

    @property
    def stored_text(self) -> bool:
        """Whether every passage's text is at hand (False right after from_json)."""
        return all(p.text for p in self.passages)

    def to_json(self) -> str:
        """The entry as stored: no body, and each passage as [headings, start - the previous
        passage's end, length] (its heading path and text are in its row): ~10 bytes a
        passage, so a 2 MB article's ~3,000 passages fit the entry's 64 KB."""
        d = asdict(self)
        del d["body"]
        d["passages"], end = [], 0
        for p in self.passages:
            d["passages"].append([len(p.headings), p.start - end, p.end - p.start])
            end = p.end
        return json.dumps(d, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, doc: str) -> EntryData:
        """The stored entry; its passages' headings and texts are placeholders until
        with_passage_texts."""
        d = json.loads(doc)
        for k in ("questions", "tags"):
            d[k] = tuple(d.get(k, ()))
        passages, end = [], 0
        for n, gap, length in d.get("passages", ()):
            passages.append(Passage(("",) * n, "", end + gap, end + gap + length))
            end += gap + length
        d["passages"] = tuple(passages)
        return cls(**d)


@dataclass(slots=True)  # built per search hit (~250 a question): slots init ~5x a frozen one's
class RowHit:
    """One matching text of an entry."""

    entry_id: str
    kind: str  # title | question | answer | excerpt | passage
    text: str
    score: float  # cosine similarity for dense hits, BM25 score for lexical hits


def tag_key(tag: str) -> str:
    return key_of(tag, TAG_KEY_HEX)


def tags_field(tags: Iterable[str], array: bool) -> list[str] | str:
    """An entry's tags as stored: their keys as an ARRAY, or, in knowledge bases made before
    ARRAY tags, as "|k1|k2|" text matched with `like`."""
    keys = [tag_key(t) for t in tags]
    if array:
        return keys
    return "|" + "|".join(keys) + "|" if keys else ""


def locale_field(locale: str) -> str:
    return tag_key(locale) if locale else ""


def short_id(entry_id: str) -> str:
    """An id as error messages quote it: at most 60 characters, so a message about a huge id
    stays far below gRPC's 16 KiB metadata limit."""
    return repr(entry_id if len(entry_id) <= 60 else entry_id[:60] + "...")


def unfit(e: EntryData) -> str | None:
    """Why the entry does not fit the collections' fields, or None. Milvus standalone rejects
    an over-long VARCHAR at insert, while Milvus Lite stores it: checked here for both.
    Lengths are UTF-8 bytes."""
    try:
        e.to_json().encode()
    except UnicodeEncodeError:
        return "it holds text that is not valid Unicode (a lone surrogate): send UTF-8"
    if len(e.id.encode()) > MAX_ID_BYTES:
        return (f"its id is {len(e.id.encode())} bytes; ids have at most {MAX_ID_BYTES} bytes "
                "(UTF-8)")
    if len(e.locale.encode()) > MAX_LOCALE_BYTES:
        return (f"locale {e.locale[:40]!r} is {len(e.locale.encode())} bytes; the limit is "
                f"{MAX_LOCALE_BYTES}: use a language tag such as en-GB")
    if len(e.tags) > MAX_TAGS:
        return f"it has {len(e.tags)} tags; the limit is {MAX_TAGS}"
    if (n := len(("|" + "|".join(e.tags) + "|").encode())) > MAX_TAGS_BYTES:
        return (f"its tags ({len(e.tags)}) take {n} bytes together; the limit is "
                f"{MAX_TAGS_BYTES}: use fewer or shorter tags")
    for kind, t in e.texts():
        if len(t.encode()) > MAX_TEXT_BYTES:
            what = ("passage" if kind == "passage" else
                    "each title, paraphrase and answer")
            return (f"it has a {kind} of {len(t.encode())} bytes; {what} may have at most "
                    f"{MAX_TEXT_BYTES}")
    if (n := len(e.to_json().encode())) > MAX_DOC_BYTES:
        return (f"it is {n} bytes as stored; the limit is {MAX_DOC_BYTES}: shorten its "
                "answer or paraphrases, or send a long text as the article body (up to "
                "SUPPORTQA_MAX_ARTICLE_BYTES)" + (f"; its {len(e.passages)} passages take "
                "about 10 bytes each: split the article" if e.passages else ""))
    return None
