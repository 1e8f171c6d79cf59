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

import functools
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from supportqa_server.errors import InvalidInput, NotFound, WrongModel

log = logging.getLogger(__name__)

INSERT_BATCH = 1000  # rows per insert: Milvus Lite 2.5 slows sharply on larger batches
MAX_TEXT_BYTES = 8192  # VARCHAR capacity of one searchable text, in bytes
MAX_DOC_BYTES = 65535  # VARCHAR capacity of one entry's JSON
MAX_ID_BYTES = 256  # of an entry id, UTF-8 (stored in the entry's JSON; Milvus sees its key)
MAX_LOCALE_BYTES = 32
MAX_TAGS_BYTES = 2048  # an entry's tags together, as "|a|b|" in UTF-8
MAX_TAGS = 100  # tags per entry: their keys, 17 bytes each, fill the tags field
# Tags one question may filter on. Each is one `like` in the filter, and Milvus Lite 2.5 fails
# a search whose filter ORs more than 50 of them ("unsupported expr proto node").
MAX_FILTER_TAGS = 32
MAX_SEARCH_LIMIT = 16384  # Milvus's largest top-k
SEARCH_TIMEOUT_S = 60.0  # one search call; Lite answers in milliseconds, a busy cluster in <1 s
PREFIX = "supportqa_"  # collections of this layout
LEGACY_PREFIX = "sqa_"  # collections of the layout before keys, moved over on open
KEY_HEX = 32  # hex digits of an entry key: 128 bits of SHA-256
TAG_KEY_HEX = 16  # of a tag or locale key; a filter's hits are checked against the entry too
_KEY_RE = re.compile(r"[0-9a-f]*")


def key_of(value: str, digits: int = KEY_HEX) -> str:
    """The store's key for a caller's value (an entry id, a tag, a locale): hex digits of its
    SHA-256, the only form in which the value reaches Milvus expressions and primary keys."""
    return hashlib.sha256(value.encode()).hexdigest()[:digits]


def _literal(key: str, template: str = "{}") -> str:
    """A key as a Milvus expression string (``template`` around it, e.g. a like pattern).
    Every value an expression compares goes through here, and only keys (hex digits) pass,
    so no caller's text is ever parsed by Milvus."""
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"not a store key: {key[:40]!r}")
    return '"' + template.format(key) + '"'


def _row_pk(key: str, version: int, index: int) -> str:
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

    def texts(self) -> list[tuple[str, str]]:
        """(kind, text) of every searchable text, duplicates removed, in a stable order."""
        return self._texts

    @functools.cached_property
    def _texts(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for kind, text in [("title", self.title)] + [("question", q) for q in self.questions] + [
            ("answer", self.answer)
        ]:
            t = text.strip()
            if t and t.casefold() not in seen:
                seen.add(t.casefold())
                out.append((kind, t))
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, doc: str) -> EntryData:
        d = json.loads(doc)
        for k in ("questions", "tags"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)


@dataclass(slots=True)  # built per search hit (~250 a question): slots init ~5x a frozen one's
class RowHit:
    """One matching text of an entry."""

    entry_id: str
    kind: str  # title | question | answer
    text: str
    score: float  # cosine similarity for dense hits, BM25 score for lexical hits


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


def _committed_row(state: _KB, pk: str) -> tuple[EntryData, int] | None:
    """(entry, row index) of a row key "key.version.index" whose version is committed;
    None for a stale or uncommitted row."""
    key, version, index = pk.split(".")
    entry_id = state.ids.get(key)
    current = None if entry_id is None else state.committed.get(entry_id)
    if current is None or current[0] != int(version):
        return None
    return current[1], int(index)


def _rows_name(kb: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{kb}_rows"


def _entries_name(kb: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{kb}_entries"


def _images_name(kb: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{kb}_images"


def _tag_key(tag: str) -> str:
    return key_of(tag, TAG_KEY_HEX)


def _tags_field(tags: Iterable[str]) -> str:
    """An entry's tags as stored: "|k1|k2|", one key per tag, matched with `like`."""
    return "|" + "|".join(map(_tag_key, tags)) + "|" if tags else ""


def _locale_field(locale: str) -> str:
    return _tag_key(locale) if locale else ""


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
    for _, t in e.texts():
        if len(t.encode()) > MAX_TEXT_BYTES:
            return (f"it has a text of {len(t.encode())} bytes; each title, paraphrase and "
                    f"answer may have at most {MAX_TEXT_BYTES}")
    if (n := len(e.to_json().encode())) > MAX_DOC_BYTES:
        return (f"it is {n} bytes as stored; the limit is {MAX_DOC_BYTES}: shorten its "
                "answer or paraphrases")
    return None


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
                        and _rows_name(kb, prefix) in names and kb not in self._kbs):
                    continue
                if prefix == LEGACY_PREFIX:
                    self._move_legacy(kb, names)
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
        state.dim = self._vector_width(_rows_name(kb))
        c.load_collection(_entries_name(kb))
        c.load_collection(_rows_name(kb))
        if self.image_dim:
            if not c.has_collection(_images_name(kb)):
                self._create_images(kb, self.image_dim)
            c.load_collection(_images_name(kb))
            state.image_dim = self._vector_width(_images_name(kb))
        for batch in self._scan(_entries_name(kb), ["version", "doc"]):
            for r in batch:
                e = EntryData.from_json(r["doc"])
                state.committed[e.id] = (int(r["version"]), e)
                state.ids[key_of(e.id)] = e.id
        for collection in (_rows_name(kb), _images_name(kb) if self.image_dim else None):
            if collection:
                self._drop_dead_rows(collection, state)
        self._kbs[kb] = state

    def _scan(self, collection: str, fields: list[str], batch_size: int = 1000
              ) -> Iterator[list[dict]]:
        """Every row of a collection, ``fields`` only, in batches (a Milvus query returns at
        most 16,384 rows, so larger reads go through its iterator)."""
        it = self.client.query_iterator(
            collection, batch_size=batch_size, filter="version >= 0", output_fields=fields
        )
        try:
            while batch := it.next():
                yield batch
        finally:
            it.close()

    def _drop_dead_rows(self, collection: str, state: _KB) -> None:
        """Deletes rows whose version is not their entry's committed one (unfinished writes)."""
        c = self.client
        dead: list[str] = []
        for batch in self._scan(collection, ["pk"]):
            dead += [r["pk"] for r in batch if _committed_row(state, r["pk"]) is None]
        if dead:
            log.warning("%s: removing %d rows of unfinished writes", collection, len(dead))
        for i in range(0, len(dead), INSERT_BATCH):
            c.delete(collection, ids=dead[i : i + INSERT_BATCH])

    def _move_legacy(self, kb: str, names: set[str]) -> None:
        """Moves a knowledge base of the layout before keys (raw ids in primary keys and
        expressions) into this one: committed entries and their rows, vectors kept, then drops
        the old collections. Until they are dropped the move is redone from the start, so a
        move cut short loses nothing."""
        c = self.client
        for name in (_rows_name(kb), _entries_name(kb), _images_name(kb)):
            if name in names:
                c.drop_collection(name)
        old_rows, old_entries = _rows_name(kb, LEGACY_PREFIX), _entries_name(kb, LEGACY_PREFIX)
        old_images = _images_name(kb, LEGACY_PREFIX)
        for name in (old_rows, old_entries) + ((old_images,) if old_images in names else ()):
            c.load_collection(name)
        committed: dict[str, tuple[int, str, EntryData]] = {}  # id -> (version, doc, entry)
        for batch in self._scan(old_entries, ["version", "doc"]):
            for r in batch:
                e = EntryData.from_json(r["doc"])
                committed[e.id] = (int(r["version"]), r["doc"], e)
        # The new collections keep the old vectors' widths, whatever this server's models.
        image_dim = self._vector_width(old_images) if old_images in names else 0
        self._create_collections(kb, self._vector_width(old_rows) or self.dim, image_dim)
        moved = 0
        for old, new, fields in (
            (old_rows, _rows_name(kb), ["pk", "kind", "text", "vector"]),
            (old_images, _images_name(kb), ["pk", "vector"]),
        ):
            if old not in names:
                continue
            for batch in self._scan(old, fields, INSERT_BATCH):
                rows = []
                for r in batch:
                    entry_id, version, index = r.pop("pk").split("\x1f")
                    if committed.get(entry_id, (None,))[0] != int(version):
                        continue
                    e = committed[entry_id][2]
                    r.update(pk=_row_pk(key_of(entry_id), int(version), int(index)),
                             entry_key=key_of(entry_id), version=int(version))
                    if "text" in r:
                        r.update(tags=_tags_field(e.tags), locale=_locale_field(e.locale))
                    rows.append(r)
                if rows:
                    c.insert(new, rows)
                    moved += len(rows)
        docs = [{"key": key_of(i), "version": v, "doc": d, "unused": [0.0, 0.0]}
                for i, (v, d, _) in committed.items()]
        for i in range(0, len(docs), INSERT_BATCH):
            c.insert(_entries_name(kb), docs[i : i + INSERT_BATCH])
        for name in (old_rows, old_entries, old_images):
            if name in names:
                c.drop_collection(name)
        log.warning("knowledge base %r: moved %d entries and %d rows to the keyed layout",
                    kb, len(committed), moved)

    @staticmethod
    def _row_schema():
        """The fields every row collection starts with: its key and its entry's key and
        version."""
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=128)
        schema.add_field("entry_key", DataType.VARCHAR, max_length=KEY_HEX)
        schema.add_field("version", DataType.INT64)
        return schema

    def _create_images(self, kb: str, image_dim: int) -> None:
        from pymilvus import DataType

        c = self.client
        schema = self._row_schema()
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=image_dim)
        index = c.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="IP")
        c.create_collection(
            _images_name(kb), schema=schema, index_params=index, consistency_level="Strong"
        )

    def _create(self, kb: str) -> _KB:
        self._create_collections(kb, self.dim, self.image_dim)
        state = _KB(kb)
        self._kbs[kb] = state
        return state

    def _create_collections(self, kb: str, dim: int, image_dim: int) -> None:
        """A knowledge base's collections, for text vectors of ``dim`` and, when
        ``image_dim``, CLIP vectors of that width."""
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        c = self.client
        rows = self._row_schema()
        rows.add_field("kind", DataType.VARCHAR, max_length=16)
        rows.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True)
        rows.add_field("tags", DataType.VARCHAR, max_length=MAX_TAGS * (TAG_KEY_HEX + 1) + 1)
        rows.add_field("locale", DataType.VARCHAR, max_length=TAG_KEY_HEX)
        rows.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        index = c.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="IP")  # unit vectors: cosine
        if self.lexical:
            rows.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            rows.add_function(
                Function(
                    name="bm25", function_type=FunctionType.BM25,
                    input_field_names=["text"], output_field_names=["sparse"],
                )
            )
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        c.create_collection(
            _rows_name(kb), schema=rows, index_params=index, consistency_level="Strong"
        )
        entries = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        entries.add_field("key", DataType.VARCHAR, is_primary=True, max_length=KEY_HEX)
        entries.add_field("version", DataType.INT64)
        entries.add_field("doc", DataType.VARCHAR, max_length=MAX_DOC_BYTES)
        entries.add_field("unused", DataType.FLOAT_VECTOR, dim=2)  # Milvus requires a vector
        eindex = c.prepare_index_params()
        eindex.add_index("unused", index_type="FLAT", metric_type="L2")
        c.create_collection(
            _entries_name(kb), schema=entries, index_params=eindex, consistency_level="Strong"
        )
        if image_dim:
            self._create_images(kb, image_dim)

    def _vector_width(self, collection: str) -> int:
        fields = self.client.describe_collection(collection).get("fields", [])
        return next((int(f.get("params", {}).get("dim", 0)) for f in fields
                     if f.get("name") == "vector"), 0)

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
            raise NotFound(
                f"knowledge base {kb!r} does not exist; existing: "
                f"{', '.join(sorted(self._kbs)) or 'none'}. Ingest entries into it first"
            )
        with self._create_lock:
            return self._kbs.get(kb) or self._create(kb)

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
                        "pk": _row_pk(key, version, i), "entry_key": key,
                        "version": version, "kind": kind, "text": text,
                        "tags": _tags_field(e.tags), "locale": _locale_field(e.locale),
                        "vector": np.asarray(v, dtype=np.float32).tolist(),
                    })
            for i in range(0, len(rows), INSERT_BATCH):
                c.insert(_rows_name(kb), rows[i : i + INSERT_BATCH])
            if self.image_dim and see_vectors is not None:
                see = [
                    {"pk": _row_pk(key_of(e.id), version, i), "entry_key": key_of(e.id),
                     "version": version, "vector": np.asarray(v, dtype=np.float32).tolist()}
                    for e, vecs in zip(entries, see_vectors, strict=True)
                    for i, v in enumerate(vecs)
                ]
                for i in range(0, len(see), INSERT_BATCH):
                    c.insert(_images_name(kb), see[i : i + INSERT_BATCH])
            docs = [
                {"key": key_of(e.id), "version": version, "doc": e.to_json(),
                 "unused": [0.0, 0.0]}
                for e in entries
            ]
            for i in range(0, len(docs), INSERT_BATCH):
                c.upsert(_entries_name(kb), docs[i : i + INSERT_BATCH])
            replaced = [e.id for e in entries if e.id in state.committed]
            state.revision += 1
            for e in entries:
                state.committed[e.id] = (version, e)
                state.ids[key_of(e.id)] = e.id
            state.revision += 1
            keys = sorted({key_of(e.id) for e in entries})
            for i in range(0, len(keys), INSERT_BATCH):
                chunk = ", ".join(map(_literal, keys[i : i + INSERT_BATCH]))
                old = f"entry_key in [{chunk}] and version < {version}"
                c.delete(_rows_name(kb), filter=old)
                if self.image_dim:
                    c.delete(_images_name(kb), filter=old)
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
                quoted = ", ".join(map(_literal, keys))
                c.delete(_entries_name(kb), filter=f"key in [{quoted}]")
                state.revision += 1
                for x, k in zip(chunk, keys, strict=True):
                    state.committed.pop(x, None)
                    state.ids.pop(k, None)
                state.revision += 1
                c.delete(_rows_name(kb), filter=f"entry_key in [{quoted}]")
                if self.image_dim:
                    c.delete(_images_name(kb), filter=f"entry_key in [{quoted}]")
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
        for batch in self._scan(_rows_name(kb), ["pk", "vector", "text"]):
            live = [(r, row[0].id) for r in batch
                    if (row := _committed_row(state, r["pk"])) is not None]
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
            _images_name(kb), [v.tolist() for v in vectors], "vector",
            min(limit, MAX_SEARCH_LIMIT), "", "IP",
        ), len(vectors))
        out = []
        for hits in found:
            live = []
            for pk, score in hits:
                row = _committed_row(state, pk)
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
        vectors: np.ndarray,
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
            vectors: (nq, dim) unit question vectors.
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
        dense = self.search_dense(kb, vectors, limit=limit, locale=locale, tags=tags)
        lex = wait_lexical() if wait_lexical else [[] for _ in texts]
        return list(zip(dense, lex, strict=True))

    def search_dense(self, kb: str, vectors: np.ndarray, *, limit: int, locale: str = "",
                     tags: Sequence[str] = ()) -> list[list[RowHit]]:
        """The dense route alone: per (nq, dim) unit vector, rows best first."""
        return self._start(kb, "vector", [v.tolist() for v in vectors], limit, locale, tags)()

    def search_lexical(self, kb: str, texts: Sequence[str], *, limit: int, locale: str = "",
                       tags: Sequence[str] = ()) -> list[list[RowHit]]:
        """The BM25 route alone: per question text, rows best first (none for a blank text,
        or when the store keeps no BM25 index)."""
        return self._start_lexical(kb, texts, limit, locale, tags)()

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
            filters.append(f'(locale == {_literal(_locale_field(locale))} or locale == "")')
        if tags:
            filters.append("(" + " or ".join(
                f"tags like {_literal(_tag_key(t), '%|{}|%')}" for t in tags
            ) + ")")
        pending = self._send_search(
            _rows_name(kb), data, field, min(limit, MAX_SEARCH_LIMIT), " and ".join(filters),
            "IP" if field == "vector" else "BM25",
        )
        if not tags:
            return lambda: [self._live(state, hits) for hits in _read_hits(pending, len(data))]
        # Tag keys are 64 bits: hits are checked against the entries' own tags, so a
        # collision of two tags' keys can never widen a filter.
        want = set(tags)

        def tagged(hits: list[RowHit]) -> list[RowHit]:
            return [h for h in hits if (e := state.committed.get(h.entry_id)) is not None
                    and want.intersection(e[1].tags)]

        return lambda: [tagged(self._live(state, hits)) for hits in _read_hits(pending, len(data))]

    def _send_search(self, collection: str, data: list, field: str, limit: int, expr: str,
                     metric: str):
        """Starts one search of ``data`` (nq queries); _read_hits waits for its rows."""
        return self.client.search(
            collection, data=data, anns_field=field, limit=limit, filter=expr,
            # no fields: the primary key "key.version.index" says it all
            output_fields=[], search_params={"metric_type": metric}, timeout=SEARCH_TIMEOUT_S,
            _async=True,
        )

    @staticmethod
    def _live(state: _KB, hits: list[tuple[str, float]]) -> list[RowHit]:
        """Row hits of committed versions, their texts taken from memory (not sent by Milvus)."""
        rows = state.hit_rows()
        out = []
        for pk, score in hits:
            try:
                row = rows[pk]
            except KeyError:
                found = _committed_row(state, pk)
                row = rows[pk] = None if found is None else (
                    found[0].id, *found[0].texts()[found[1]]
                )
            if row is not None:
                out.append(RowHit(*row, score))
        return out
