"""Article-shaped evaluation: a help centre's articles as the knowledge base, people's
rephrasings of their questions as the queries, and BM25 over the same texts in the same run
as the baseline to beat."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from supportqa.v1 import supportqa_pb2

from supportqa_tools.datasets import EvalInputError, Example
from supportqa_tools.metrics import Outcome

# How each article becomes entries:
#   article  - one entry per article: title, and the answers as a Markdown body with one
#              section each (the server splits it into passages);
#   passage  - one entry per article as today's intent-style entry: title and the answers
#              joined as its answer text (what a team does without article ingestion);
#   text     - like passage, with no title (a FAQ page's answer paragraph alone).
SHAPES = ("article", "passage", "text")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class FaqArticle:
    id: str
    title: str
    sections: tuple[str, ...]  # the article's parts (StackFAQ: the thread's answers)


def is_faq_file(path: Path) -> bool:
    """Whether a --kb file is a StackFAQ-style JSON of articles ({"root": {"qapair": ...}})."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(256).decode("utf-8", "replace")
    return '"root"' in head and '"qapair"' in head


def read_faq(path: str | Path) -> tuple[list[FaqArticle], list[Example]]:
    """Reads a StackFAQ-style file: per thread its question (the title), its answers and the
    people's rephrasings of the question (the queries, labelled with the article's id).

    Raises:
        EvalInputError: The file is not JSON of that shape.
    """
    path = Path(path)
    try:
        pairs = json.loads(path.read_text(encoding="utf-8-sig"))["root"]["qapair"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalInputError(f"{path}: expected StackFAQ JSON ({{\"root\": {{\"qapair\": "
                             f"[...]}}}}): {e}") from e
    articles, queries = [], []
    for i, pair in enumerate(pairs):
        answers = pair.get("answer") or []
        answers = [answers] if isinstance(answers, str) else answers
        sections = tuple(a.strip() for a in answers if isinstance(a, str) and a.strip())
        if not sections:
            continue
        article = FaqArticle(f"thread-{i:04d}", (pair.get("question") or "").strip(), sections)
        articles.append(article)
        # A rephrasing of one word ("*" marks a missing one in StackFAQ) asks nothing.
        queries += [Example(r.strip(), article.id) for r in pair.get("rephr") or []
                    if isinstance(r, str) and len(r.split()) >= 2]
    if not articles:
        raise EvalInputError(f"{path}: no article with an answer")
    return articles, queries


def faq_entries(articles: Sequence[FaqArticle], knowledge_base: str, shape: str
                ) -> list[supportqa_pb2.Entry]:
    """The knowledge base's entries, one per article, in the given SHAPES shape."""
    out = []
    for a in articles:
        if shape == "article":
            body = "\n\n".join(f"## Answer {k + 1}\n\n{s}" for k, s in enumerate(a.sections))
            out.append(supportqa_pb2.Entry(
                knowledge_base=knowledge_base, id=a.id, title=a.title, body=body,
                body_format=supportqa_pb2.BODY_FORMAT_MARKDOWN))
        else:
            out.append(supportqa_pb2.Entry(
                knowledge_base=knowledge_base, id=a.id,
                title=a.title if shape == "passage" else "", answer="\n\n".join(a.sections)))
    return out


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_outcomes(entries: Sequence[supportqa_pb2.Entry], queries: Sequence[Example],
                  top_k: int) -> list[Outcome]:
    """The baseline: Okapi BM25 (rank-bm25, k1 1.5, b 0.75) over each entry's title, answer,
    body and paraphrases as one document, lower-cased words; per query its top_k entries."""
    import numpy as np
    from rank_bm25 import BM25Okapi

    docs = [words(" ".join([e.title, e.answer, e.body, *e.questions])) for e in entries]
    bm25 = BM25Okapi(docs)
    ids = [e.id for e in entries]
    out = []
    for q in queries:
        scores = bm25.get_scores(words(q.text))
        top = np.argsort(-scores, kind="stable")[:top_k]
        out.append(Outcome(q.label, ranked=tuple(ids[i] for i in top),
                           scores=tuple(float(scores[i]) for i in top), latency_ms=0.0))
    return out
