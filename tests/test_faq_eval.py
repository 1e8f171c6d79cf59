"""The article-shaped evaluation's pieces: a StackFAQ-style file read into articles and
queries, entries in each shape, and the BM25 baseline scored on the same entries."""

from __future__ import annotations

import json

import pytest
from supportqa.v1 import supportqa_pb2 as pb
from supportqa_tools.datasets import EvalInputError
from supportqa_tools.faq import bm25_outcomes, faq_entries, is_faq_file, read_faq
from supportqa_tools.metrics import compute_metrics

FAQ = {"root": {"qapair": [
    {"question": "Strikethrough with GitHub Markdown",
     "answer": ["Use ~~tildes~~ around the words.", "The <del> tag works too."],
     "rephr": ["How do I cross out text on github?", "*", None, "strike text github markdown"]},
    {"question": "Delete a Facebook account", "answer": "Open settings and choose delete.",
     "rephr": ["How can I remove my facebook account for good?"]},
    {"question": "No answers here", "answer": [], "rephr": ["never asked about this"]},
] + [{"question": f"Unrelated topic {i}", "answer": [f"Filler text number {i} on printers."],
      "rephr": []} for i in range(4)]}}  # BM25's IDF needs a corpus of more than two


@pytest.fixture
def faq_file(tmp_path):
    path = tmp_path / "faq.json"
    path.write_text(json.dumps(FAQ))
    return path


def test_threads_become_articles_and_rephrasings_queries(faq_file, tmp_path):
    assert is_faq_file(faq_file)
    (tmp_path / "other.json").write_text('{"train": [["hi", "greet"]]}')
    assert not is_faq_file(tmp_path / "other.json")
    articles, queries = read_faq(faq_file)
    assert [a.id for a in articles][:3] == ["thread-0000", "thread-0001", "thread-0003"]
    assert articles[0].sections == ("Use ~~tildes~~ around the words.", "The <del> tag works too.")
    # "*" and None are StackFAQ's missing rephrasings; a thread without answers asks nothing.
    assert [(q.text, q.label) for q in queries] == [
        ("How do I cross out text on github?", "thread-0000"),
        ("strike text github markdown", "thread-0000"),
        ("How can I remove my facebook account for good?", "thread-0001")]


def test_each_shape_of_entry(faq_file):
    articles, _ = read_faq(faq_file)
    article, passage, text = (faq_entries(articles, "kb", s)[0]
                              for s in ("article", "passage", "text"))
    assert article.body.startswith("## Answer 1\n\nUse ~~tildes~~")
    assert article.body_format == pb.BODY_FORMAT_MARKDOWN and not article.answer
    assert passage.title == "Strikethrough with GitHub Markdown" and "<del>" in passage.answer
    assert not text.title and text.answer == passage.answer


def test_bm25_baseline_ranks_the_shared_words_first(faq_file):
    articles, queries = read_faq(faq_file)
    outcomes = bm25_outcomes(faq_entries(articles, "kb", "passage"), queries, top_k=2)
    assert [o.ranked[0] for o in outcomes] == ["thread-0000", "thread-0000", "thread-0001"]
    assert compute_metrics(outcomes)["accuracy_at_1"] == 1.0


def test_a_file_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"root": {"items": []}}')
    with pytest.raises(EvalInputError, match="StackFAQ"):
        read_faq(path)
