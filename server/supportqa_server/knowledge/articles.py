"""Help-centre articles (Markdown, HTML or plain text) as a title and passages that the
sentence encoder reads whole: no passage's text takes more than ``budget`` word pieces.

Markup is parsed by libraries, never by patterns: markdown-it-py's tokens (``.map`` line
ranges give offsets) and BeautifulSoup on the stdlib ``html.parser`` (tags' ``sourceline`` and
``sourcepos`` give offsets). Every format becomes one stream of headings and blocks; headings
open sections, whose blocks are packed greedily into passages. A block over budget is cut at
sentence ends, a sentence still over budget at spaces, a word between characters.

Sections are never merged, however short: an answer points at the passage under the heading
that matched ("Refunds > How long a refund takes"), and a one-line section is a precise one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import yaml
from bs4 import BeautifulSoup, Tag
from bs4.element import PreformattedString
from markdown_it import MarkdownIt
from markdown_it.token import Token

FORMATS = ("markdown", "html", "text")
_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html",
             ".txt": "text"}
_SNIFF_CHARS = 65536  # of a body's start that guess_format parses: the first element is early
_MD = MarkdownIt("commonmark").enable("table")
_MD_NEWLINE = re.compile(r"\r\n?|\n")  # the line breaks markdown-it counts in .map
_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"[.?!]\s+|\n")  # in plain text: ". ", "? ", "! " or a line break
# HTML elements whose content is never article text: site chrome, code, metadata.
_SKIP = frozenset({"script", "style", "nav", "header", "footer", "aside", "noscript",
                   "template", "head", "title", "svg"})
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
# HTML elements that end the text before them and start a block; all others are inline.
_BREAKS = _HEADINGS | frozenset({
    "p", "li", "pre", "blockquote", "dd", "dt", "tr", "td", "th", "div", "section", "article",
    "main", "body", "html", "table", "thead", "tbody", "tfoot", "ul", "ol", "dl", "figure",
    "figcaption", "caption", "details", "summary", "form", "fieldset", "address", "hr"})
_Count = Callable[[str], int]  # a text's length in the encoder's word pieces


class ArticleError(ValueError):
    """An article that cannot be turned into passages; the message says why and what to do."""


@dataclass(frozen=True)
class Passage:
    """One searchable piece of an article: its text and where it lies in the body as sent."""

    headings: tuple[str, ...]  # enclosing headings, outermost first, without the title
    text: str  # plain text: paragraphs joined by "\n\n", list items and table rows by "\n"
    start: int  # str index in the body where the passage's first block starts
    end: int  # str index (exclusive) where its last block ends


@dataclass(frozen=True)
class Article:
    title: str
    passages: tuple[Passage, ...]
    meta: dict  # Markdown front matter; {} for other formats


@dataclass
class _Block:
    text: str
    start: int
    end: int  # -1 while an HTML block waits for the next tag to learn its end
    line: bool = False  # a list item or table row: joined to a line block before it by "\n"


@dataclass(frozen=True, eq=False)  # compared by identity: the title's heading is one object
class _Heading:
    level: int
    text: str


def _flat(text: str) -> str:
    return " ".join(text.split())


def _lines(text: str) -> str:
    return "\n".join(flat for line in text.splitlines() if (flat := _flat(line)))


def _span(body: str, start: int, end: int) -> tuple[int, int]:
    """``start``..``end`` less whitespace at either side, never empty."""
    while start < end - 1 and body[start].isspace():
        start += 1
    while end > start + 1 and body[end - 1].isspace():
        end -= 1
    return start, max(end, min(start + 1, len(body)))


def guess_format(name: str, body: str) -> str:
    """The format of an article from its file name's suffix, else from its body: "html" when
    the body starts with "<" and parses to at least one element, else "markdown"."""
    if fmt := _SUFFIXES.get(PurePosixPath(name).suffix.lower()):
        return fmt
    head = body.lstrip()[:_SNIFF_CHARS]
    if head.startswith("<") and BeautifulSoup(head, "html.parser").find() is not None:
        return "html"
    return "markdown"


def _front_matter(body: str) -> tuple[dict, int]:
    """The YAML mapping between a first line "---" and the next "---" line, and the offset
    after that line; {} and 0 when the body has no front matter."""
    lines = body.split("\n")
    if lines[0].rstrip() != "---":
        return {}, 0
    close = next((k for k in range(1, len(lines)) if lines[k].rstrip() == "---"), 0)
    if not close:
        raise ArticleError("the front matter opened by '---' on line 1 has no closing '---' "
                           "line; close it or remove the opening line")
    try:
        data = yaml.safe_load("\n".join(lines[1:close])) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 2} of the body" if mark else ""  # +1: 1-based, +1: '---'
        raise ArticleError(f"the front matter is not valid YAML ({getattr(exc, 'problem', exc)}"
                           f"{where}); fix it or remove the '---' lines") from exc
    if not isinstance(data, dict):
        raise ArticleError(f"the front matter must be a YAML mapping (title: ..., url: ...), not "
                           f"a {type(data).__name__}; write it as 'key: value' lines")
    return data, min(len(body), sum(len(line) + 1 for line in lines[:close + 1]))


def _markdown(body: str) -> tuple[dict, list[_Block | _Heading]]:
    """Front matter, then headings and blocks from markdown-it's tokens; a block spans the
    lines of its token's .map. Inline markup is dropped, images leave their alt text."""
    meta, offset = _front_matter(body)
    source = body[offset:]
    line_starts = [offset, *(offset + m.end() for m in _MD_NEWLINE.finditer(source))]
    items: list[_Block | _Heading] = []
    markers: list[str] = []  # per open list item: "- " until its first block takes it
    row: Token | None = None  # the open table row's tr_open
    cells: list[str] = []  # its cells
    level = 0  # of the heading whose text comes next; 0 outside headings

    def add(text: str, tok: Token, line: bool = False) -> None:
        lines = tok.map or [0, 0]  # every block token has one
        if text:
            if markers and markers[-1]:
                text, markers[-1], line = markers[-1] + text, "", True
            end = line_starts[lines[1]] if lines[1] < len(line_starts) else len(body)
            items.append(_Block(text, *_span(body, line_starts[lines[0]], end), line))

    for tok in _MD.parse(source):
        if tok.type == "list_item_open":
            if markers:
                markers[-1] = ""  # an item that opens with a sublist: the sublist's marker counts
            markers.append("- ")
        elif tok.type == "list_item_close":
            markers.pop()
        elif tok.type == "heading_open":
            level = int(tok.tag[1])
        elif tok.type == "tr_open":
            row, cells = tok, []
        elif tok.type == "tr_close" and row is not None:
            add(" | ".join(cell for cell in cells if cell), row, line=True)
            row = None
        elif tok.type == "inline":
            text = "".join(
                " " if c.type == "softbreak" else "\n" if c.type == "hardbreak" else c.content
                for c in tok.children or ()
                if c.type in ("text", "text_special", "code_inline", "image", "softbreak",
                              "hardbreak"))
            if level:
                items.append(_Heading(level, _flat(text)))
                level = 0
            elif row is not None:
                cells.append(_flat(text))
            else:
                add(_lines(text), tok)
        elif tok.type in ("fence", "code_block"):
            add(_lines(tok.content), tok)
        elif tok.type == "html_block":
            soup = BeautifulSoup(tok.content, "html.parser")
            for tag in soup.find_all(_SKIP):
                tag.decompose()
            add(_flat(soup.get_text(" ")), tok)
    return meta, items


class _HtmlReader:
    """Headings and blocks of a parsed HTML page in document order. A block starts at its
    element's start tag (loose text: at the tag before it) and ends where the next tag starts,
    less whitespace: html.parser records where start tags are, not where closing tags are."""

    def __init__(self, body: str) -> None:
        self.body = body
        # sourceline counts "\n" only (1-based); sourcepos is a str index within that line.
        self.line_starts = [0, *(m.end() for m in re.finditer("\n", body))]
        self.items: list[_Block | _Heading] = []
        self.pending: list[_Block] = []  # blocks that end where the next tag starts
        self.run: list[str] = []  # text of the block being read
        self.origin = -1  # where that block starts; -1 until it has text or a block tag
        self.last = 0  # where the last tag seen starts
        self.markers: list[str] = []  # per open <li>: "- " until its first block takes it

    def read(self, soup: BeautifulSoup) -> list[_Block | _Heading]:
        """Walks the tree with an explicit stack: deep nesting must not hit the recursion limit."""
        stack, owners = [iter(soup.contents)], [None]
        while stack:
            node = next(stack[-1], None)
            if node is None:
                stack.pop()
                if (owner := owners.pop()) is not None and owner.name in _BREAKS:
                    self.flush()
                    if owner.name == "li":
                        self.markers.pop()
            elif isinstance(node, Tag):
                if self.enter(node):
                    stack.append(iter(node.contents))
                    owners.append(node)
            elif not isinstance(node, PreformattedString):  # comments, doctypes, CDATA
                if self.origin < 0 and node.strip():
                    self.origin = self.last
                self.run.append(_SPACES.sub(" ", node))  # HTML renders line breaks as spaces
        self.resolve(len(self.body))
        return self.items

    def resolve(self, pos: int) -> None:
        for block in self.pending:
            block.start, block.end = _span(self.body, block.start, pos)
        self.pending.clear()

    def flush(self, line: bool = False) -> None:
        """Ends the block being read; it ends where the next tag starts."""
        text, origin = _lines("".join(self.run)), self.origin
        self.run, self.origin = [], -1
        if text:
            if self.markers and self.markers[-1]:
                text, self.markers[-1], line = self.markers[-1] + text, "", True
            self.items.append(_Block(text, origin, -1, line))
            self.pending.append(self.items[-1])

    def enter(self, tag: Tag) -> bool:
        """Reads a start tag; whether to read its children too (headings, rows and pre are
        read whole, skipped elements not at all)."""
        name = tag.name
        if name in _BREAKS:
            self.flush()
        if tag.sourceline is not None and tag.sourcepos is not None:
            self.last = self.line_starts[tag.sourceline - 1] + tag.sourcepos
        self.resolve(self.last)
        if name == "br":
            self.run.append("\n")
        if name not in _BREAKS:
            return name not in _SKIP
        self.origin = self.last
        if name in _HEADINGS:
            self.items.append(_Heading(int(name[1]), _flat(tag.get_text(" "))))
            self.origin = -1
            return False
        if name in ("tr", "pre"):  # a row as "cell | cell"; code keeps its lines
            self.run = [" | ".join(c for cell in tag.find_all(("td", "th"))
                                   if (c := _flat(cell.get_text(" "))))
                        if name == "tr" else tag.get_text()]
            self.flush(line=name == "tr")
            return False
        if name == "li":
            if self.markers:
                self.markers[-1] = ""  # an item that opens with a sublist
            self.markers.append("- ")
        return True


def _html(body: str) -> tuple[list[_Block | _Heading], str]:
    """The page's headings and blocks, and its <title> (outside SVG images) or ""."""
    soup = BeautifulSoup(body, "html.parser")
    page_title = next((_flat(tag.get_text()) for tag in soup.find_all("title")
                       if tag.find_parent("svg") is None), "")
    return _HtmlReader(body).read(soup), page_title


def _plain(body: str) -> list[_Block | _Heading]:
    """Paragraphs: runs of non-blank lines, their line breaks read as spaces."""
    blocks: list[_Block | _Heading] = []
    start, end, pos = -1, 0, 0
    for line in [*body.split("\n"), ""]:  # the "" ends the last paragraph
        if line.strip():
            start, end = pos if start < 0 else start, pos + len(line)
        elif start >= 0:
            blocks.append(_Block(_flat(body[start:end]), *_span(body, start, end)))
            start = -1
        pos += len(line) + 1
    return blocks


def _longest(i: int, n: int, fits: Callable[[int, int], bool]) -> int:
    """The largest j <= n with fits(i, j), given fits(i, i + 1): doubling, then bisecting,
    so a passage of k pieces costs O(log k) counts of at most twice its text."""
    lo, hi, probe = i + 1, n + 1, i + 2  # fits(i, lo) holds; hi does not fit or is past n
    while probe < hi:
        if not fits(i, probe):
            hi = probe
            break
        lo, probe = probe, i + 2 * (probe - i)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(i, mid) else (lo, mid)
    return lo


def _split(text: str, count: _Count, budget: int, level: int = 0) -> list[str]:
    """``text`` in pieces of at most ``budget`` tokens: cut at sentence ends (level 0), a
    sentence still too long at spaces (1), a word still too long between characters (2)."""
    if level == 0 and count(text) <= budget:
        return [text]
    cuts: range | list[int] = range(len(text) + 1) if level == 2 else [
        0, *(m.end() for m in (_SENTENCE_END if level == 0 else _SPACES).finditer(text)),
        len(text)]
    pieces: list[str] = []
    i = 0
    while i < len(cuts) - 1:
        piece = text[cuts[i]:cuts[i + 1]].strip()
        if piece and count(piece) <= budget:
            j = _longest(i, len(cuts) - 1,
                         lambda a, b: count(text[cuts[a]:cuts[b]].strip()) <= budget)
            pieces.append(text[cuts[i]:cuts[j]].strip())
            i = j
            continue
        if piece and level == 2:
            raise ArticleError(f"a token budget of {budget} is too small: the single character "
                               f"{piece!r} takes {count(piece)} tokens; raise the budget")
        if piece:
            pieces += _split(piece, count, budget, level + 1)
        i += 1
    return pieces


def _place(body: str, block: _Block, pieces: list[str]) -> list[_Block]:
    """Source ranges for the pieces of a split block. Each later piece starts at its first
    word, searched from the previous piece's start plus that piece's length (markup, entities
    and whitespace make the source at least as long as its text) within a window proportional
    to the piece, so that placing stays linear in the body."""
    starts = [block.start]
    for prev, piece in zip(pieces, pieces[1:], strict=False):
        cursor = min(starts[-1] + len(prev), block.end - 1)
        found = body.find(piece.split(None, 1)[0], cursor,
                          min(block.end, cursor + 4 * len(piece) + 256))
        starts.append(found if found >= 0 else cursor)
    ends = [*starts[1:], block.end]
    return [_Block(piece, *_span(body, start, end), block.line and k == 0)
            for k, (piece, start, end) in enumerate(zip(pieces, starts, ends, strict=True))]


def _pack(headings: tuple[str, ...], blocks: list[_Block], body: str, count: _Count,
          budget: int) -> list[Passage]:
    """One section's blocks as passages, each holding as many whole blocks (or pieces of
    a block over budget) as fit."""
    units: list[_Block] = []
    for block in blocks:
        pieces = _split(block.text, count, budget)
        units += _place(body, block, pieces) if len(pieces) > 1 else [block]
    parts, offsets, size = [], [], 0  # offsets: where each unit starts in the joined text
    for k, unit in enumerate(units):
        if k:
            parts.append("\n" if unit.line and units[k - 1].line else "\n\n")
            size += len(parts[-1])
        offsets.append(size)
        parts.append(unit.text)
        size += len(unit.text)
    joined = "".join(parts)

    def text(i: int, j: int) -> str:
        return joined[offsets[i]:offsets[j - 1] + len(units[j - 1].text)]

    passages, i = [], 0
    while i < len(units):
        j = _longest(i, len(units), lambda a, b: count(text(a, b)) <= budget)
        passages.append(Passage(headings, text(i, j), units[i].start, units[j - 1].end))
        i = j
    return passages


def _sections(items: list[_Block | _Heading], dropped: _Heading | None
              ) -> list[tuple[tuple[str, ...], list[_Block]]]:
    """Blocks grouped under their heading paths, sections without blocks left out; the
    ``dropped`` heading (the title's) opens a section but joins no path."""
    stack: list[_Heading] = []
    sections: list[tuple[tuple[str, ...], list[_Block]]] = [((), [])]
    for item in items:
        if isinstance(item, _Block):
            sections[-1][1].append(item)
        elif item.text:  # an empty heading names nothing
            while stack and stack[-1].level >= item.level:
                stack.pop()
            if item is not dropped:
                stack.append(item)
            sections.append((tuple(h.text for h in stack), []))
    return [section for section in sections if section[1]]


def parse_article(body: str, fmt: str, *, count_tokens: Callable[[str], int], budget: int,
                  title: str = "") -> Article:
    """An article's title and passages, no passage's text over ``budget`` tokens as
    ``count_tokens`` counts them. The title is ``title`` if given, else the front matter's,
    else the first h1 (HTML: else its <title>), else the first heading; the first h1 (else
    first heading) joins no passage's heading path when its text is the title."""
    if fmt not in FORMATS:
        raise ArticleError(f"unknown article format {fmt!r}; use one of {', '.join(FORMATS)} "
                           "(guess_format picks one from the file name)")
    if budget < 1:
        raise ArticleError(f"the token budget must be at least 1, not {budget}")
    meta: dict = {}
    page_title = ""  # HTML's <title>
    if fmt == "markdown":
        meta, items = _markdown(body)
    elif fmt == "html":
        items, page_title = _html(body)
    else:
        items = _plain(body)
    if not any(isinstance(item, _Block) for item in items):
        raise ArticleError(f"the article has no text: its {fmt} body ({len(body)} characters) "
                           "has no paragraph, list, code or table outside headings; check the "
                           "body and its format")
    if isinstance(meta.get("title"), dict | list):
        raise ArticleError("the front matter's title must be text, not a list or mapping")
    headings = [item for item in items if isinstance(item, _Heading) and item.text]
    named = next((h for h in headings if h.level == 1), headings[0] if headings else None)
    chosen = _flat(title) or _flat(str(meta.get("title") or ""))
    if not chosen and named is not None and (named.level == 1 or not page_title):
        chosen = named.text
    chosen = chosen or page_title
    dropped = named if named is not None and named.text.casefold() == chosen.casefold() else None
    sections = [_pack(path, blocks, body, count_tokens, budget)
                for path, blocks in _sections(items, dropped)]
    return Article(chosen, tuple(p for section in sections for p in section), meta)
