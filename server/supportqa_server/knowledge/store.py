"""The knowledge base in Milvus: a row per entry text, versioned so no reader sees half an entry.

Layout per knowledge base NAME (a collection pair, so knowledge bases are isolated and can be
dropped on their own):
- `supportqa_NAME_rows`: one row per searchable text of an entry (its title, each paraphrase,
  its answer): dense vector, BM25 sparse vector (Milvus BM25 function over `text`), entry key,
  entry version, tag keys and locale key for filtering.
- `supportqa_NAME_entries`: one row per entry: its key, committed version and the entry as JSON.
- `supportqa_NAME_images`: with CLIP, one row per image or text of an entry in CLIP space.

Callers' values (entry ids, tags, locales) never enter a Milvus expression or primary key:
each is stored as its key, a digest of fixed hex digits (`key_of`), and the id itself lives in
the entry's JSON. Any UTF-8 id therefore works, and no id can change what a filter or a delete
means. Knowledge bases written by the layout before keys (`sqa_NAME_*`) are moved over when the
store opens.

Writes are ordered so that a reader sees either the old or the new version of an entry, whole:
new rows go in under a new version, then the entry row is replaced (the commit point), then
the old rows are deleted. Search drops any row whose version is not the committed one, so
stale paraphrases can never match and half-written ones are never seen. Rows of a write that
died before its commit point are removed the next time the store opens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from supportqa_server.errors import InvalidInput, NotFound, UnknownKnowledgeBase, WrongModel
from supportqa_server.knowledge.entries import (  # noqa: F401 - the store's API, re-exported
    MAX_FILTER_TAGS,
    MAX_ID_BYTES,
    EntryData,
    RowHit,
    key_of,
    literal,
    locale_field,
    row_pk,
    short_id,
    tag_key,
    tags_field,
    unfit,
)
from supportqa_server.knowledge.layout import (
    INSERT_BATCH,
    LEGACY_PREFIX,
    PREFIX,
    create_collections,
    create_images,
    entries_name,
    images_name,
    move_legacy,
    rows_name,
    scan,
    vector_width,
)

log = logging.getLogger(__name__)

MAX_SEARCH_LIMIT = 16384  # Milvus's largest top-k
SEARCH_TIMEOUT_S = 60.0  # one search call; Lite answers in milliseconds, a busy cluster in <1 s



@dataclass
class _KB:
    name: str
    committed: dict[str, tuple[int, EntryData]] = field(default_factory=dict)  # by entry id
    ids: dict[str, str] = field(default_factory=dict)  # entry key -> entry id, of committed
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Bumped before and after every change to ``committed``, so a view derived at one
    # revision never mixes states.
    revision: int = 0
    dim: int = 0  # width of its text vectors as created (0: this process's)
    image_dim: int = 0  # the same for its CLIP vectors

    # Row key -> (entry id, kind, text), or None for a stale row: filled by searches, valid
    # for one revision (a search's hits are keys; splitting and looking each up was half of
    # the Python time of a search: ~250 hits a question).
    _hit_rows: tuple[int, dict[str, tuple[str, str, str] | None]] = field(
        default_factory=lambda: (-1, {}), repr=False, compare=False
    )

    @property
    def rows(self) -> int:
        return sum(len(e.texts()) for _, e in self.committed.values())

    def hit_rows(self) -> dict[str, tuple[str, str, str] | None]:
        """This revision's row cache (a new one after a write)."""
        revision, rows = self._hit_rows
        if revision != self.revision:
            revision, rows = self._hit_rows = (self.revision, {})
        return rows

    @property
    def image_rows(self) -> int:
        return sum(e.see_rows for _, e in self.committed.values())

    def committed_row(self, pk: str) -> tuple[EntryData, int] | None:
        """(entry, row index) of a row key "key.version.index" whose version is committed;
        None for a stale or uncommitted row."""
        key, version, index = pk.split(".")
        entry_id = self.ids.get(key)
        current = None if entry_id is None else self.committed.get(entry_id)
        if current is None or current[0] != int(version):
            return None
        return current[1], int(index)

    def live(self, hits: list[tuple[str, float]]) -> list[RowHit]:
        """Row hits of committed versions, their texts taken from memory (not sent by Milvus)."""
        rows = self.hit_rows()
        out = []
        for pk, score in hits:
            try:
                row = rows[pk]
            except KeyError:
                found = self.committed_row(pk)
                row = rows[pk] = None if found is None else (
                    found[0].id, *found[0].texts()[found[1]]
                )
            if row is not None:
                out.append(RowHit(*row, score))
        return out


def _read_hits(pending, nq: int) -> list[list[tuple[str, float]]]:
    """Waits for a search of nq queries sent with ``_async=True``: per query, (primary key,
    score) pairs, best first.

    pymilvus would build a dict-like Hit per row (6,400 for 32 questions at 200 rows: half of
    a 42 ms batched search on 2 cores, docs/benchmarks/text.md); the reply's three flat arrays are
    read here instead. pymilvus 2.5's SearchFuture keeps the gRPC future as ``_future``.

    Raises:
        MilvusException: the search failed.
    """
    from pymilvus.client.utils import check_status
    from pymilvus.exceptions import MilvusException

    pending.exception()  # raises what failed before the request was sent
    try:
        reply = pending._future.result()
    except Exception as e:  # grpc.RpcError and its timeouts, as pymilvus reports them
        raise MilvusException(message=str(e)) from e
    check_status(reply.status)
    r = reply.results
    ids = list(r.ids.str_id.data) if r.ids.HasField("str_id") else [
        str(i) for i in r.ids.int_id.data
    ]
    scores = list(r.scores)
    out, start = [], 0
    for k in r.topks:
        out.append(list(zip(ids[start : start + k], scores[start : start + k], strict=True)))
        start += k
    return out + [[] for _ in range(nq - len(out))]  # an empty collection sends no topks


class KnowledgeStore:
    """Milvus-backed knowledge bases. Thread-safe; writes to one knowledge base are serialised.

    Args:
        uri: Milvus Lite file path (a local `*.db`) or a standalone/cluster URI.
        dim: Dimension of the dense text vectors.
        token: Credentials for a standalone/cluster server.
        db_name: Database on a standalone/cluster server.
        lexical: Keep a BM25 index beside the dense one.
        image_dim: Dimension of the CLIP space; 0 keeps no image rows.
    """

    def __init__(
        self, uri: str, dim: int, *, token: str = "", db_name: str = "", lexical: bool = True,
        image_dim: int = 0,
    ) -> None:
        self.uri = uri
        self.dim = dim
        self.lexical = lexical
        self.image_dim = image_dim
        self._token = token
        self._db_name = db_name
        self._kbs: dict[str, _KB] = {}
        self._create_lock = threading.Lock()
        self._last_version = 0
        self._client = None

    def open(self) -> None:
        """Connects, loads every knowledge base's committed entries, removes dead rows."""
        from pymilvus import MilvusClient

        kwargs = {"uri": self.uri}
        if self._token:
            kwargs["token"] = self._token
        if self._db_name:
            kwargs["db_name"] = self._db_name
        self._client = MilvusClient(**kwargs)
        names = set(self._client.list_collections())
        for prefix in (LEGACY_PREFIX, PREFIX):
            for name in sorted(names):
                kb = name[len(prefix) : -len("_entries")]
                if not (name.startswith(prefix) and name.endswith("_entries")
                        and rows_name(kb, prefix) in names and kb not in self._kbs):
                    continue
                if prefix == LEGACY_PREFIX:
                    move_legacy(self.client, kb, names, dim=self.dim, lexical=self.lexical)
                self._load(kb)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def client(self):
        if self._client is None:
            raise RuntimeError("the store is not open")
        return self._client

    def _load(self, kb: str) -> None:
        state = _KB(kb)
        c = self.client
        state.dim = vector_width(self.client, rows_name(kb))
        c.load_collection(entries_name(kb))
        c.load_collection(rows_name(kb))
        if self.image_dim:
            if not c.has_collection(images_name(kb)):
                create_images(c, kb, self.image_dim)
            c.load_collection(images_name(kb))
            state.image_dim = vector_width(self.client, images_name(kb))
        for batch in scan(self.client, entries_name(kb), ["version", "doc"]):
            for r in batch:
                e = EntryData.from_json(r["doc"])
                state.committed[e.id] = (int(r["version"]), e)
                state.ids[key_of(e.id)] = e.id
        for collection in (rows_name(kb), images_name(kb) if self.image_dim else None):
            if collection:
                self._drop_dead_rows(collection, state)
        self._kbs[kb] = state

    def _drop_dead_rows(self, collection: str, state: _KB) -> None:
        """Deletes rows whose version is not their entry's committed one (unfinished writes)."""
        c = self.client
        dead: list[str] = []
        for batch in scan(self.client, collection, ["pk"]):
            dead += [r["pk"] for r in batch if state.committed_row(r["pk"]) is None]
        if dead:
            log.warning("%s: removing %d rows of unfinished writes", collection, len(dead))
        for i in range(0, len(dead), INSERT_BATCH):
            c.delete(collection, ids=dead[i : i + INSERT_BATCH])

    def _check_width(self, state: _KB, vectors: str) -> None:
        have, want, setting = (
            (state.dim, self.dim, "SUPPORTQA_TEXT_MODEL") if vectors == "text"
            else (state.image_dim, self.image_dim, "SUPPORTQA_CLIP_MODEL")
        )
        if have and want and have != want:
            raise WrongModel(
                f"knowledge base {state.name!r} was written with {have}-d {vectors} vectors, "
                f"but this server's {vectors} model gives {want}-d: serve it with the model it "
                f"was written with ({setting}), or ingest it again under a new name or into a "
                "fresh SUPPORTQA_DATA_DIR"
            )

    def _kb(self, kb: str, *, create: bool = False, vectors: str = "") -> _KB:
        """A knowledge base's state. ``vectors`` ("text" or "image"): the caller writes or
        searches those vectors, so they must be as wide as this process's model's."""
        state = self._kbs.get(kb)
        if state is not None:
            if vectors:
                self._check_width(state, vectors)
            return state
        if not create:
            raise UnknownKnowledgeBase(kb, self._kbs)
        with self._create_lock:
            if kb not in self._kbs:
                create_collections(self.client, kb, self.dim, self.image_dim,
                                   lexical=self.lexical)
                self._kbs[kb] = _KB(kb)
            return self._kbs[kb]

    def _next_version(self) -> int:
        v = max(time.time_ns(), self._last_version + 1)
        self._last_version = v
        return v

    def knowledge_bases(self) -> list[str]:
        return sorted(self._kbs)

    def has(self, kb: str) -> bool:
        return kb in self._kbs

    def upsert(
        self,
        kb: str,
        entries: Sequence[EntryData],
        vectors: Sequence[np.ndarray],
        see_vectors: Sequence[np.ndarray] | None = None,
    ) -> tuple[int, int]:
        """Writes entries with their text vectors (vectors[i] has one row per entries[i].texts()).

        see_vectors[i], when CLIP is on, holds entries[i].see_rows CLIP vectors: its images,
        then its texts.

        Returns:
            (entries that replaced an existing version, rows written).
        """
        for e in entries:
            if (why := unfit(e)) is not None:
                raise InvalidInput(f"entry {short_id(e.id)}: {why}")
        state = self._kb(kb, create=True, vectors="text")
        if self.image_dim and see_vectors is not None:
            self._check_width(state, "image")
        c = self.client
        with state.lock:
            version = self._next_version()
            rows = []
            for e, vecs in zip(entries, vectors, strict=True):
                texts = e.texts()
                if len(texts) != len(vecs):
                    raise ValueError(f"entry {e.id!r}: {len(texts)} texts, {len(vecs)} vectors")
                key = key_of(e.id)
                for i, ((kind, text), v) in enumerate(zip(texts, vecs, strict=True)):
                    rows.append({
                        "pk": row_pk(key, version, i), "entry_key": key,
                        "version": version, "kind": kind, "text": text,
                        "tags": tags_field(e.tags), "locale": locale_field(e.locale),
                        "vector": np.asarray(v, dtype=np.float32).tolist(),
                    })
            for i in range(0, len(rows), INSERT_BATCH):
                c.insert(rows_name(kb), rows[i : i + INSERT_BATCH])
            if self.image_dim and see_vectors is not None:
                see = [
                    {"pk": row_pk(key_of(e.id), version, i), "entry_key": key_of(e.id),
                     "version": version, "vector": np.asarray(v, dtype=np.float32).tolist()}
                    for e, vecs in zip(entries, see_vectors, strict=True)
                    for i, v in enumerate(vecs)
                ]
                for i in range(0, len(see), INSERT_BATCH):
                    c.insert(images_name(kb), see[i : i + INSERT_BATCH])
            docs = [
                {"key": key_of(e.id), "version": version, "doc": e.to_json(),
                 "unused": [0.0, 0.0]}
                for e in entries
            ]
            for i in range(0, len(docs), INSERT_BATCH):
                c.upsert(entries_name(kb), docs[i : i + INSERT_BATCH])
            replaced = [e.id for e in entries if e.id in state.committed]
            state.revision += 1
            for e in entries:
                state.committed[e.id] = (version, e)
                state.ids[key_of(e.id)] = e.id
            state.revision += 1
            keys = sorted({key_of(e.id) for e in entries})
            for i in range(0, len(keys), INSERT_BATCH):
                chunk = ", ".join(map(literal, keys[i : i + INSERT_BATCH]))
                old = f"entry_key in [{chunk}] and version < {version}"
                c.delete(rows_name(kb), filter=old)
                if self.image_dim:
                    c.delete(images_name(kb), filter=old)
        return len(replaced), len(rows)

    def delete(self, kb: str, ids: Sequence[str]) -> tuple[int, list[str]]:
        """Deletes entries; returns (deleted count, ids that did not exist)."""
        state = self._kb(kb)
        c = self.client
        with state.lock:
            present = sorted({i for i in ids if i in state.committed})
            missing = [i for i in ids if i not in state.committed]
            for i in range(0, len(present), INSERT_BATCH):
                chunk = present[i : i + INSERT_BATCH]
                keys = [key_of(x) for x in chunk]
                quoted = ", ".join(map(literal, keys))
                c.delete(entries_name(kb), filter=f"key in [{quoted}]")
                state.revision += 1
                for x, k in zip(chunk, keys, strict=True):
                    state.committed.pop(x, None)
                    state.ids.pop(k, None)
                state.revision += 1
                c.delete(rows_name(kb), filter=f"entry_key in [{quoted}]")
                if self.image_dim:
                    c.delete(images_name(kb), filter=f"entry_key in [{quoted}]")
        return len(present), missing

    def get(self, kb: str, entry_id: str) -> EntryData:
        state = self._kb(kb)
        found = state.committed.get(entry_id)
        if found is None:
            raise NotFound(f"entry {entry_id!r} is not in knowledge base {kb!r}")
        return found[1]

    def entry(self, kb: str, entry_id: str) -> EntryData | None:
        found = self._kbs[kb].committed.get(entry_id) if kb in self._kbs else None
        return None if found is None else found[1]

    def revision(self, kb: str) -> int:
        """A number that changes whenever a knowledge base's entries do."""
        return self._kb(kb).revision

    def texts(self, kb: str) -> tuple[int, list[str]]:
        """(revision, every searchable text of the committed entries) of a knowledge base."""
        state = self._kb(kb)
        with state.lock:
            return state.revision, [t for _, e in state.committed.values() for _, t in e.texts()]

    def text_vectors(
        self, kb: str, max_rows: int
    ) -> tuple[int, list[str], np.ndarray, list[str]] | None:
        """(revision, entry id per row, (rows, dim) text vectors, row texts) of the committed
        entries, for the entry head (head.py); None when the knowledge base has more than
        ``max_rows`` rows.

        Read without the write lock: rows are kept only when their version is committed at
        the end, and a write during the read changes the revision, so the caller sees that
        what it trained on is already old.
        """
        state = self._kb(kb, vectors="text")
        revision = state.revision
        if state.rows > max_rows:
            return None
        labels, vecs, texts = [], [], []
        for batch in scan(self.client, rows_name(kb), ["pk", "vector", "text"]):
            live = [(r, row[0].id) for r in batch
                    if (row := state.committed_row(r["pk"])) is not None]
            labels += [entry_id for _, entry_id in live]
            live = [r for r, _ in live]
            texts += [r["text"] for r in live]
            # To float32 a batch at a time: as Python floats, 100k rows of 384 would take 1 GB.
            vecs.append(np.asarray([r["vector"] for r in live], np.float32).reshape(-1, self.dim))
        empty = np.zeros((0, self.dim), np.float32)
        return revision, labels, np.concatenate(vecs or [empty]), texts

    def counts(self, kb: str) -> tuple[int, int, int]:
        """(entries, text rows, image rows) of a knowledge base."""
        state = self._kb(kb)
        return len(state.committed), state.rows, state.image_rows

    def search_images(self, kb: str, vectors: np.ndarray, *, limit: int) -> list[list[RowHit]]:
        """Searches the CLIP space (entry images and texts) with question image vectors."""
        state = self._kb(kb, vectors="image")
        if not self.image_dim:
            return [[] for _ in vectors]
        found = _read_hits(self._send_search(
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
        if tags:
            filters.append("(" + " or ".join(
                f"tags like {literal(tag_key(t), '%|{}|%')}" for t in tags
            ) + ")")
        pending = self._send_search(
            rows_name(kb), data, field, min(limit, MAX_SEARCH_LIMIT), " and ".join(filters),
            "IP" if field == "vector" else "BM25",
        )
        if not tags:
            return lambda: [state.live(hits) for hits in _read_hits(pending, len(data))]
        # Tag keys are 64 bits: hits are checked against the entries' own tags, so a
        # collision of two tags' keys can never widen a filter.
        want = set(tags)

        def tagged(hits: list[RowHit]) -> list[RowHit]:
            return [h for h in hits if (e := state.committed.get(h.entry_id)) is not None
                    and want.intersection(e[1].tags)]

        return lambda: [tagged(state.live(hits)) for hits in _read_hits(pending, len(data))]

    def _send_search(self, collection: str, data: list, field: str, limit: int, expr: str,
                     metric: str):
        """Starts one search of ``data`` (nq queries); _read_hits waits for its rows."""
        return self.client.search(
            collection, data=data, anns_field=field, limit=limit, filter=expr,
            # no fields: the primary key "key.version.index" says it all
            output_fields=[], search_params={"metric_type": metric}, timeout=SEARCH_TIMEOUT_S,
            _async=True,
        )
