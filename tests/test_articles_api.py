"""Help-centre articles through the real server: a folder of Markdown and HTML articles (one of
them long) ingested with the CLI, answers that point at the passage that matched, passages
read back after a restart, long answers split instead of refused, --prune."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from supportqa.v1 import supportqa_pb2 as pb

pytestmark = pytest.mark.slow

CLI = Path(sys.executable).with_name("supportqa")

BILLING = """---
title: Billing and refunds
url: https://help.example.com/billing
tags: [billing]
---

# Billing and refunds

How we charge you, and how to get money back.

## Refunds

### How long a refund takes

A refund reaches your card within five to seven working days. Banks can take two more days
to show it on your statement.

### Refunds for annual plans

Annual plans are refunded pro rata for the months you have not used.

## Invoices

Download any invoice as a PDF from the Billing page of your account settings.
"""

SHIPPING = """<html><head><title>Shipping</title></head><body>
<nav><a href="/">Home</a> <a href="/help">Help</a></nav>
<h1>Shipping and delivery</h1>
<h2>International shipping</h2>
<p>We ship to forty countries. Customs duties are paid by the recipient on arrival.</p>
<h2>Tracking a parcel</h2>
<p>Your tracking number is in the dispatch email; enter it on the carrier's website.</p>
<footer>Copyright Example Ltd</footer>
</body></html>
"""


def long_article() -> str:
    """~300 KB of Markdown: many sections of filler, one of them about the thing asked."""
    filler = ("This section describes a feature of the product in general terms, with more "
              "words about settings, menus and screens that nobody asks about. ") * 12
    parts = ["# Product manual\n"]
    for i in range(200):
        parts.append(f"## Feature {i}\n\n{filler}\n")
        if i == 137:
            parts.append("## Resetting the router\n\nHold the reset button on the back of the "
                         "router for ten seconds until the light blinks orange, then wait two "
                         "minutes for it to restart.\n")
    return "\n".join(parts)


async def ingest(target: str, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    """The CLI, on a thread: the server under test runs on this test's event loop."""
    return await asyncio.to_thread(
        subprocess.run,
        [str(CLI), "--target", target, "--timeout", "600", "ingest", str(folder), *extra],
        capture_output=True, text=True, timeout=600)


@pytest.fixture
def articles(tmp_path: Path) -> Path:
    folder = tmp_path / "help"
    (folder / "guides").mkdir(parents=True)
    (folder / "billing.md").write_text(BILLING)
    (folder / "shipping.html").write_text(SHIPPING)
    (folder / "guides" / "manual.md").write_text(long_article())
    (folder / ".draft.md").write_text("# Hidden\n\nnot published")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")  # not an article format: skipped
    return folder


async def test_articles_ingest_and_answer_with_the_passage(articles, tmp_path):
    from supportqa.client import AsyncSupportClient
    from supportqa_server.api.server import running_server
    from supportqa_server.runtime.settings import Settings

    settings = Settings(port=0, data_dir=tmp_path / "data", speech_model="", ocr=False,
                        clip_model="")
    async with running_server(settings) as target:
        done = await ingest(target, articles)
        assert done.returncode == 0, done.stderr
        assert "received 3, written 3" in done.stdout
        async with AsyncSupportClient(target, timeout=60) as c:
            assert await c.list_ids() == ["billing.md", "guides/manual.md", "shipping.html"]
            stats = (await c.stats("default")).knowledge_bases[0]
            assert stats.entries == 3 and stats.rows > 200  # the manual alone has ~200 passages

            reply = await c.ask("how many days until my refund shows up", top_k=3)
            top = reply.answers[0]
            assert top.entry_id == "billing.md" and top.title == "Billing and refunds"
            assert top.url == "https://help.example.com/billing" and list(top.tags) == ["billing"]
            assert list(top.passage.headings) == ["Refunds", "How long a refund takes"]
            assert "five to seven working days" in top.passage.text
            assert top.answer == top.passage.text  # an article's answer is its passage
            assert "five to seven" in BILLING[top.passage.start:top.passage.end]
            assert "five to seven working days" in top.short_answer
            assert len(top.short_answer) < len(top.passage.text)

            reply = await c.ask("how do I reset my router", top_k=1)
            top = reply.answers[0]
            assert top.entry_id == "guides/manual.md"
            assert list(top.passage.headings) == ["Resetting the router"]
            assert "ten seconds" in long_article()[top.passage.start:top.passage.end]

            reply = await c.ask("who pays customs duties on international orders", top_k=1)
            top = reply.answers[0]
            assert top.entry_id == "shipping.html" and top.title == "Shipping and delivery"
            assert list(top.passage.headings) == ["International shipping"]
            assert "Home" not in top.passage.text  # the nav bar is not content
            assert "Customs duties" in SHIPPING[top.passage.start:top.passage.end]

            # An intent-style entry with an answer longer than a passage: split, not refused,
            # and its whole answer still comes back.
            long_answer = " ".join(
                f"Step {i}: open the settings page and check option {i} twice." for i in range(80)
            ) + " Finally, the warranty covers water damage for two years."
            summary = await c.upsert([{"id": "long", "title": "Setup guide",
                                       "answer": long_answer}])
            assert summary.written == 1 and summary.rows > 3
            reply = await c.ask("does the warranty cover water damage", top_k=1)
            top = reply.answers[0]
            assert top.entry_id == "long" and top.answer == long_answer
            assert "water damage" in top.passage.text
            assert "water damage" in long_answer[top.passage.start:top.passage.end]

            with pytest.raises(Exception) as bad:
                await c.upsert([pb.Entry(id="empty", body="# Only a heading\n")])
            assert "INVALID_ARGUMENT" in str(bad.value) and "no text" in str(bad.value)

        # A changed article replaces all its passages: the old text is gone, rows not doubled.
        async with AsyncSupportClient(target, timeout=60) as c:
            rows_before = (await c.stats("default")).knowledge_bases[0].rows
        (articles / "billing.md").write_text(BILLING.replace("five to seven", "three"))
        done = await ingest(target, articles)
        assert done.returncode == 0, done.stderr
        async with AsyncSupportClient(target, timeout=60) as c:
            top = (await c.ask("how many days until my refund shows up", top_k=1)).answers[0]
            assert "within three working days" in top.passage.text
            assert (await c.stats("default")).knowledge_bases[0].rows == rows_before

        # --prune: a file gone from the folder is deleted; other entries stay.
        (articles / "shipping.html").unlink()
        done = await ingest(target, articles, "--prune")
        assert done.returncode == 0, done.stderr
        assert "pruned 1 article(s)" in done.stdout
        async with AsyncSupportClient(target, timeout=60) as c:
            assert await c.list_ids() == ["billing.md", "guides/manual.md", "long"]

    # After a restart the passages' texts come back from their rows.
    async with running_server(settings) as target:
        async with AsyncSupportClient(target, timeout=60) as c:
            reply = await c.ask("how many days until my refund shows up", top_k=1)
            top = reply.answers[0]
            assert top.entry_id == "billing.md"
            assert "within three working days" in top.passage.text
            assert list(top.passage.headings) == ["Refunds", "How long a refund takes"]
            got = await c.get("guides/manual.md")
            assert got.title == "Product manual" and not got.body  # the body is not kept
