"""Searching a knowledge base's rows: both routes in flight at once, hits kept only when
their version is committed, tags checked against the entries themselves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from supportqa_server.knowledge.client import read_hits
from supportqa_server.knowledge.entries import RowHit, literal, locale_field, tag_key
from supportqa_server.knowledge.layout import images_name, rows_name

MAX_SEARCH_LIMIT = 16384  # Milvus's largest top-k
SEARCH_TIMEOUT_S = 60.0  # one search call; Lite answers in milliseconds, a busy cluster in <1 s


class SearchMixin:
    """KnowledgeStore's searches (it provides client, lexical, image_dim and _kb)."""

    def search_images(self, kb: str, vectors: np.ndarray, *, limit: int) -> list[list[RowHit]]:
        """Searches the CLIP space (entry images and texts) with question image vectors."""
        state = self._kb(kb, vectors="image")
        if not self.image_dim:
            return [[] for _ in vectors]
        found = read_hits(self._send_search(
            images_name(kb), [v.tolist() for v in vectors], "vector",
            min(limit, MAX_SEARCH_LIMIT), "", "IP",
        ), len(vectors))
        out = []
        for hits in found:
            live = []
            for pk, score in hits:
                row = state.committed_row(pk)
                if row is None:
                    continue
                e, i = row
                if i < e.image_count:
                    kind, text = "image", f"[image {i + 1} of {e.title or e.id}]"
                else:
                    kind, text = e.texts()[i - e.image_count]
                live.append(RowHit(e.id, kind, text, score))
            out.append(live)
        return out

    def search(
        self,
        kb: str,
        vectors: np.ndarray | None,
        texts: Sequence[str],
        *,
        limit: int,
        locale: str = "",
        tags: Sequence[str] = (),
        lexical: bool = True,
        lexical_limit: int | None = None,
    ) -> list[tuple[list[RowHit], list[RowHit]]]:
        """Searches several questions in one call per route.

        Args:
            vectors: (nq, dim) unit question vectors; None searches BM25 alone.
            texts: nq question texts for the BM25 route.
            limit: Rows per question and route.
            lexical_limit: Rows per question for the BM25 route, when fewer than ``limit``.

        Returns:
            Per question, (dense hits, lexical hits), best first, stale rows removed.
        """
        wait_lexical = (
            self._start_lexical(kb, texts, min(limit, lexical_limit or limit), locale, tags)
            if lexical else None
        )
        # Both routes are in flight at once: a lone question waits for the slower route, not
        # for both (docs/benchmarks/text.md).
        dense = (self._start(kb, "vector", [v.tolist() for v in vectors], limit, locale, tags)()
                 if vectors is not None else [[] for _ in texts])
        lex = wait_lexical() if wait_lexical else [[] for _ in texts]
        return list(zip(dense, lex, strict=True))

    def _start_lexical(self, kb: str, texts: Sequence[str], limit: int, locale: str,
                       tags: Sequence[str]):
        nonempty = [i for i, t in enumerate(texts) if t.strip()] if self.lexical else []
        wait = self._start(kb, "sparse", [texts[i] for i in nonempty], limit, locale, tags)

        def result() -> list[list[RowHit]]:
            out: list[list[RowHit]] = [[] for _ in texts]
            for i, hits in zip(nonempty, wait(), strict=True):
                out[i] = hits
            return out

        return result

    def _start(self, kb: str, field: str, data: list, limit: int, locale: str,
               tags: Sequence[str]):
        """Sends one route's search; returns the function that waits for its live rows."""
        state = self._kb(kb, vectors="text" if field == "vector" else "")
        if not data:
            return list
        filters = []
        if locale:
            filters.append(f'(locale == {literal(locale_field(locale))} or locale == "")')
        if tags and state.array_tags:
            keys = ", ".join(literal(tag_key(t)) for t in tags)
            filters.append(f"array_contains_any(tags, [{keys}])")
        elif tags:
            filters.append("(" + " or ".join(
                f"tags like {literal(tag_key(t), '%|{}|%')}" for t in tags
            ) + ")")
        pending = self._send_search(
            rows_name(kb), data, field, min(limit, MAX_SEARCH_LIMIT), " and ".join(filters),
            "IP" if field == "vector" else "BM25",
        )
        if not tags:
            return lambda: [state.live(hits) for hits in read_hits(pending, len(data))]
        # Tag keys are 64 bits: hits are checked against the entries' own tags, so a
        # collision of two tags' keys can never widen a filter.
        want = set(tags)

        def tagged(hits: list[RowHit]) -> list[RowHit]:
            return [h for h in hits if (e := state.committed.get(h.entry_id)) is not None
                    and want.intersection(e[1].tags)]

        return lambda: [tagged(state.live(hits)) for hits in read_hits(pending, len(data))]

    def _send_search(self, collection: str, data: list, field: str, limit: int, expr: str,
                     metric: str):
        """Starts one search of ``data`` (nq queries); _read_hits waits for its rows."""
        return self.client.search(
            collection, data=data, anns_field=field, limit=limit, filter=expr,
            # no fields: the primary key "key.version.index" says it all
            output_fields=[], search_params={"metric_type": metric}, timeout=SEARCH_TIMEOUT_S,
            # Session: this process's own writes are seen at once, and a search does not
            # wait for the server's time tick (~200 ms a search at Strong on Milvus 2.3).
            consistency_level="Session", _async=True,
        )
