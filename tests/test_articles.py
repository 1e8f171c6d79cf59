"""Help-centre articles as passages: titles, heading paths, budgets, offsets, formats."""

from __future__ import annotations

import random
import re
import time

import pytest
from supportqa_server.knowledge.articles import (
    FORMATS,
    Article,
    ArticleError,
    Passage,
    guess_format,
    parse_article,
)


def words(text: str) -> int:
    """A stand-in for the encoder's tokenizer: one token per word."""
    return len(text.split())


def parse(body: str, fmt: str = "markdown", budget: int = 200, **kwargs) -> Article:
    return parse_article(body, fmt, count_tokens=words, budget=budget, **kwargs)


def check(article: Article, body: str, budget: int) -> None:
    """Every passage fits the budget, passages run in body order, and each one's source slice
    holds its first and last words."""
    previous = 0
    for passage in article.passages:
        assert words(passage.text) <= budget
        assert 0 <= passage.start < passage.end <= len(body)
        assert passage.start >= previous
        previous = passage.start
        found = re.findall(r"\w+", passage.text)
        source = body[passage.start:passage.end]
        assert found[0] in source and found[-1] in source, (passage, source[:200])


ARTICLE = """\
# Reset your password

If you forgot your password, you can reset it from the sign-in page at any time.

## Before you start

You need access to the email address on your account and a few minutes of time.

## Steps

Follow these steps in order on a computer or a phone with a browser.

### On the web

- Open the **sign-in** page.
- Click `Forgot password`.
  - Check your spam folder too.

```
curl -X POST https://example.com/reset
```

### In the app

Tap Settings, then Account, then Reset password and follow the prompts there.
"""


def test_markdown_title_from_h1_is_left_out_of_heading_paths() -> None:
    article = parse(ARTICLE, budget=12)  # every section has over 12 // 4 words: none merge
    assert article.title == "Reset your password"
    assert article.meta == {}
    paths = [passage.headings for passage in article.passages]
    assert paths[0] == ()
    assert ("Before you start",) in paths
    assert ("Steps", "On the web") in paths
    assert ("Steps", "In the app") in paths
    assert all("Reset your password" not in path for path in paths)
    check(article, ARTICLE, 12)


def test_markdown_keeps_list_items_and_code_blocks() -> None:
    article = parse(ARTICLE, budget=40)
    web = next(p for p in article.passages if p.headings == ("Steps", "On the web"))
    assert web.text == ("- Open the sign-in page.\n- Click Forgot password.\n"
                        "- Check your spam folder too.\n\n"
                        "curl -X POST https://example.com/reset")
    assert ARTICLE[web.start:web.end].startswith("- Open the **sign-in** page.")
    assert ARTICLE[web.start:web.end].endswith("https://example.com/reset\n```")


def test_front_matter_gives_title_and_meta_and_offsets_skip_it() -> None:
    front = "---\ntitle: Billing FAQ\nurl: https://help.example.com/billing\ntags: [billing]\n---\n"
    body = front + "## Refunds\n\nRefunds take five working days to reach your card.\n"
    article = parse(body)
    assert article.title == "Billing FAQ"
    assert article.meta == {"title": "Billing FAQ", "url": "https://help.example.com/billing",
                            "tags": ["billing"]}
    (passage,) = article.passages
    assert passage.headings == ("Refunds",)
    assert passage.start >= len(front)
    assert body[passage.start:passage.end] == "Refunds take five working days to reach your card."


def test_caller_title_wins_and_a_different_h1_stays_in_paths() -> None:
    article = parse(ARTICLE, budget=12, title="Password help")
    assert article.title == "Password help"
    assert article.passages[0].headings == ("Reset your password",)
    assert parse(ARTICLE, title="reset YOUR password").passages[0].headings == ()


def test_first_heading_of_any_level_is_the_title_without_h1() -> None:
    body = "## Shipping\n\nWe ship worldwide in three days.\n\n### Costs\n\nFree above 50 euros.\n"
    article = parse(body, budget=8)
    assert article.title == "Shipping"
    assert [p.headings for p in article.passages] == [(), ("Costs",)]


def test_setext_headings_and_tables() -> None:
    body = "Plans\n=====\n\nCompare\n-------\n\n| Plan | Price |\n|---|---|\n| Free | 0 |\n"
    article = parse(body, budget=8)
    assert article.title == "Plans"
    (passage,) = article.passages
    assert passage.headings == ("Compare",)
    assert passage.text == "Plan | Price\nFree | 0"


def test_short_sections_stay_apart() -> None:
    body = ("## Contact\n\nMail us.\n\n## Hours\n\nNine to five.\n\n### Holidays\n\nClosed.\n")
    article = parse(body, budget=40, title="Help")
    assert [(p.headings, p.text) for p in article.passages] == [
        (("Contact",), "Mail us."), (("Hours",), "Nine to five."),
        (("Hours", "Holidays"), "Closed.")]


def test_long_paragraph_splits_at_sentences_then_words_then_characters() -> None:
    sentence = "Refunds go back to the card you paid with. "
    body = "# T\n\n" + sentence * 30 + "\n\n" + "w " * 300 + "\n\n" + "x" * 500 + "\n"
    article = parse_article(body, "markdown", count_tokens=lambda s: len(s) // 40 + 1,
                            budget=10)
    assert all(len(p.text) // 40 + 1 <= 10 for p in article.passages)
    sentences = [p for p in article.passages if "Refunds" in p.text]
    assert len(sentences) > 1
    assert all(p.text.split("\n\n")[0].endswith("paid with.") for p in sentences)
    assert all(body[p.start:].startswith("Refunds go back") for p in sentences)
    spaced = [p.text for p in article.passages if "w w" in p.text]
    assert len(spaced) > 1 and spaced[-1].endswith("w")  # cut at spaces
    assert "".join(p.text for p in article.passages if p.text.startswith("x")) == "x" * 500
    check(article, body, 10**6)  # (check counts words; the budget here is in characters)


def test_budget_too_small_for_one_character() -> None:
    with pytest.raises(ArticleError, match="too small"):
        parse_article("# T\n\nabc\n", "markdown", count_tokens=lambda s: 3 * len(s), budget=2)


def test_one_megabyte_article_is_fast_and_within_budget() -> None:
    rng = random.Random(7)
    vocab = "account password reset billing invoice refund login email team workspace".split()
    parts = ["---\ntitle: Big\n---\n# Big article\n\nIntro paragraph.\n\n"]
    for k in range(1500):
        parts.append(f"## Section {k}\n\n" + " ".join(rng.choices(vocab, k=60)) + ".\n\n"
                     "- first item\n- second item\n\n")
        if k % 7 == 0:
            parts.append(f"### Code {k}\n\n```\nrun --flag {k}\n```\n\n")
        if k == 700:  # one paragraph of about 400 KB, sentences now and then
            parts.append(" ".join(w + ("." if rng.random() < 0.01 else "")
                                  for w in rng.choices(vocab, k=55_000)) + "\n\n")
    parts.append("## Blob\n\n" + "z" * 20_000 + "\n")
    body = "".join(parts)
    assert len(body) > 1_000_000
    began = time.perf_counter()
    article = parse(body)
    elapsed = time.perf_counter() - began
    assert elapsed < 15, elapsed  # linear work takes about a second; quadratic takes minutes
    assert article.title == "Big"
    assert len(article.passages) > 1000
    check(article, body, 200)


def test_html_drops_chrome_and_reads_headings_lists_tables() -> None:
    body = """<!doctype html>
<html><head><title>Acme Help</title><style>p {color: red}</style></head>
<body><nav><a href="/">Home</a> <a href="/docs">Docs</a></nav>
<header><h1>Acme</h1></header>
<main>
<h1>Two-factor sign-in</h1>
<p>Turn on two-factor
   sign-in &amp; keep your account safe.</p>
<script>track("page")</script>
<h2>Methods</h2>
<ul><li>Authenticator app</li><li><p>SMS code</p><ul><li>Needs a phone</li></ul></li></ul>
<table><tr><th>Method</th><th>Cost</th></tr><tr><td>App</td><td>Free</td></tr></table>
<!-- an editor's note that must not show -->
<div>Still stuck? <a href="/contact">Contact us</a>.</div>
</main>
<aside>Related: billing</aside><footer>Copyright Acme</footer>
</body></html>"""
    article = parse(body, "html", budget=12)
    assert article.title == "Two-factor sign-in"
    texts = "\n".join(p.text for p in article.passages)
    for dropped in ("Home", "Docs", "Acme\n", "track", "color", "editor", "Related", "Copyright"):
        assert dropped not in texts
    first = article.passages[0]
    assert first.headings == ()
    assert first.text == "Turn on two-factor sign-in & keep your account safe."
    assert body[first.start:first.end].startswith("<p>Turn on")
    assert body[first.start:first.end].endswith("safe.</p>")
    methods = [p for p in article.passages if p.headings == ("Methods",)]
    assert "- Authenticator app\n- SMS code\n- Needs a phone" in methods[0].text
    assert any("Method | Cost\nApp | Free" in p.text for p in methods)
    assert methods[-1].text.endswith("\n\nStill stuck? Contact us.")
    check(article, body, 12)


def test_html_title_falls_back_to_title_element() -> None:
    body = "<html><head><title>Acme Help - Invoices</title></head><body>" \
           "<h2>Download</h2><p>Open Billing, then Invoices.</p></body></html>"
    article = parse(body, "html")
    assert article.title == "Acme Help - Invoices"
    assert article.passages[0].headings == ("Download",)


def test_html_offsets_count_crlf_and_non_ascii() -> None:
    body = "<p>Café\r\nopening hours</p>\r\n<p>Ünïcode second paragraph</p>"
    first, second = parse(body, "html", budget=3).passages
    assert body[first.start:first.end] == "<p>Café\r\nopening hours</p>"
    assert body[second.start:second.end] == "<p>Ünïcode second paragraph</p>"


def test_plain_text_paragraphs_and_offsets() -> None:
    body = "First paragraph\nwrapped here.\n\n\n   Second   one.  \n\nThird."
    article = parse(body, "text", budget=2, title="Notes")
    assert article.title == "Notes"
    assert [p.text for p in article.passages] == [
        "First paragraph", "wrapped here.", "Second one.", "Third."]
    assert [body[p.start:p.end] for p in article.passages] == [
        "First paragraph", "wrapped here.", "Second   one.", "Third."]
    assert all(p.headings == () for p in article.passages)
    assert parse(body, "text").passages[0].text.startswith("First paragraph wrapped here.\n\n")


def test_markdown_offsets_with_crlf() -> None:
    body = "# T\r\n\r\nOne line\r\nand more.\r\n\r\n## S\r\n\r\nLast words.\r\n"
    article = parse(body, budget=2)
    assert [body[p.start:p.end] for p in article.passages] == [
        "One line", "and more.", "Last words."]


@pytest.mark.parametrize(("name", "body", "fmt"), [
    ("faq.md", "<p>x</p>", "markdown"),
    ("FAQ.Markdown", "", "markdown"),
    ("docs/page.HTM", "# not html", "html"),
    ("page.html", "", "html"),
    ("notes.txt", "<p>x</p>", "text"),
    ("", "  \n <div>Hi</div>", "html"),
    ("export", "<!doctype html><html><body>x</body></html>", "html"),
    ("export.json", "# Title", "markdown"),
    ("", "<3 our customers", "markdown"),
    ("", "Plain words", "markdown"),
])
def test_guess_format(name: str, body: str, fmt: str) -> None:
    assert guess_format(name, body) == fmt
    assert fmt in FORMATS


@pytest.mark.parametrize(("body", "fmt", "message"), [
    ("", "markdown", "has no text"),
    ("  \n\n ", "text", "has no text"),
    ("# Only a heading\n", "markdown", "has no text"),
    ("<nav>menu</nav><script>x()</script>", "html", "has no text"),
    ("---\ntitle: [unclosed\n---\nBody.\n", "markdown", "not valid YAML"),
    ("---\n- a list\n---\nBody.\n", "markdown", "must be a YAML mapping"),
    ("---\ntitle: x\nBody without a closing line.\n", "markdown", "no closing"),
    ("---\ntitle: [a, b]\n---\nBody.\n", "markdown", "title must be text"),
    ("Body.", "pdf", "unknown article format"),
])
def test_article_errors(body: str, fmt: str, message: str) -> None:
    with pytest.raises(ArticleError, match=message):
        parse(body, fmt)
    assert issubclass(ArticleError, ValueError)


def test_passages_are_frozen() -> None:
    passage = parse("Some text.").passages[0]
    assert passage == Passage((), "Some text.", 0, 10)
    with pytest.raises(AttributeError):
        passage.text = "changed"  # type: ignore[misc]


def test_an_article_entry_is_stored_compactly_and_read_back_from_its_rows() -> None:
    from supportqa_server.knowledge.entries import MAX_DOC_BYTES, EntryData

    body = "# Manual\n\n" + "".join(
        f"## Part {i}\n\n### Step {i} > sub\n\n" + "Press the button and wait. " * 30 + "\n\n"
        for i in range(1500))
    assert len(body) > 1_000_000
    article = parse(body, budget=200)
    entry = EntryData(id="manual.md", answer="", title=article.title, passages=article.passages)
    doc = entry.to_json()
    assert len(doc.encode()) < MAX_DOC_BYTES and len(article.passages) >= 1500
    stored = EntryData.from_json(doc)
    assert [(p.start, p.end) for p in stored.passages] == [
        (p.start, p.end) for p in article.passages]
    assert not stored.stored_text
    rows = dict(enumerate(t for _, t in entry.texts()))  # what the rows hold
    back = stored.with_passage_texts(rows)
    assert back.passages == entry.passages  # headings (one with " > " in it) and texts
    assert back.texts() == entry.texts()
