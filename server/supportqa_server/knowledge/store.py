"""The knowledge bases in Milvus: a row per entry text, versioned so no reader sees half an
entry, shared by every replica on one Milvus. Collections and keys: layout.py.

A write inserts rows under a new version, reads the versions it replaces from Milvus, replaces
the entry rows (the commit point), records the change in `supportqa_meta`, then deletes the
rows of exactly the versions it replaced: another replica's write in flight, under another
version, is never touched, and of two concurrent writes of one entry the later commit wins,
whole. Search drops rows whose version is not committed. Rows of a write that died before its
commit are removed when a store opens, once older than DEAD_ROW_AGE_S. Each replica keeps the
committed entries in memory and re-reads a knowledge base when its `supportqa_meta` revision
moves (`refresh`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence

import numpy as np

from supportqa_server.errors import InvalidInput, NotFound, UnknownKnowledgeBase
from supportqa_server.knowledge.client import TimedClient
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
    META,
    PREFIX,
    RowDeletes,
    array_tags,
    create_collections,
    create_images,
    create_meta,
    drop_dead_rows,
    entries_name,
    images_name,
    is_server,
    move_legacy,
    passage_texts,
    rows_name,
    scan,
    server_has_bm25,
    stored_versions,
    tags_as_array,
    vector_width,
)
from supportqa_server.knowledge.retrieval import SearchMixin
from supportqa_server.knowledge.state import KBState

log = logging.getLogger(__name__)

# Rows of an uncommitted version younger than this may be another replica's write in flight;
# older ones are of a write that died, and go when the store opens (s).
DEAD_ROW_AGE_S = 600.0
POLL_TIMEOUT_S = 3  # a poll of supportqa_meta; longer and Milvus is reported down (s)
LOAD_TIMEOUT_S = 10  # loading a collection again after an outage (s)
READ_TRIES = 3  # re-reads of a knowledge base that this process's own writes overlapped



class KnowledgeStore(SearchMixin):
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
        image_dim: int = 0, delete_delay_s: float = 0.0,
    ) -> None:
        self.uri = uri
        self.dim = dim
        self.lexical = lexical
        self.image_dim = image_dim
        self._token = token
        self._db_name = db_name
        self._kbs: dict[str, KBState] = {}
        self._create_lock = threading.Lock()
        self._last_version = 0
        self._client = None
        self.server_version = ""
        self.delete_delay_s = delete_delay_s
        self._deletes: RowDeletes | None = None

    def open(self) -> None:
        """Connects, loads every knowledge base's committed entries, removes dead rows."""
        from pymilvus import MilvusClient

        # A connection of its own: pymilvus shares one per URI in a process, and closing a
        # store would cut off every other store on that URI (replicas in one test process).
        kwargs = {"uri": self.uri, "alias": f"supportqa-{uuid.uuid4().hex}"}
        if self._token:
            kwargs["token"] = self._token
        if self._db_name:
            kwargs["db_name"] = self._db_name
        self._client = TimedClient(MilvusClient(**kwargs))
        # On a shared server, replaced rows are deleted a while after the commit: a replica
        # that has not caught up yet still finds the version it knows.
        self._deletes = RowDeletes(self._client, bool(self.image_dim),
                                   self.delete_delay_s if is_server(self.uri) else 0.0)
        bm25, self.server_version = server_has_bm25(self._client, self.uri)
        if self.lexical and not bm25:
            log.warning("lexical (BM25) route off: Milvus %s has no BM25 function (it needs "
                        "2.5 or later); questions are answered by the dense route alone",
                        self.server_version)
            self.lexical = False
        names = set(self._client.list_collections())
        if META not in names:
            create_meta(self._client)
        self._client.load_collection(META)
        for prefix in (LEGACY_PREFIX, PREFIX):
            for name in sorted(names):
                kb = name[len(prefix) : -len("_entries")]
                if not (name.startswith(prefix) and name.endswith("_entries")
                        and rows_name(kb, prefix) in names and kb not in self._kbs):
                    continue
                if prefix == LEGACY_PREFIX:
                    move_legacy(self.client, kb, names, dim=self.dim, lexical=self.lexical,
                                tag_array=tags_as_array(self.uri))
                self._load(kb)
        published = self._published()
        for kb, state in self._kbs.items():
            if kb not in published:  # made before supportqa_meta: other replicas learn of it
                self._publish(kb, self._next_version())
            state.published = published.get(kb, state.published)

    @property
    def shared(self) -> bool:
        """Whether other processes may write this store (a Milvus server, not a Lite file)."""
        return is_server(self.uri)

    @property
    def routes(self) -> tuple[str, ...]:
        """The retrieval routes this store serves."""
        return ("dense", "lexical") if self.lexical else ("dense",)

    def close(self) -> None:
        if self._client is not None:
            self._deletes.run(everything=True)
            self._client.close()
            self._client = None

    @property
    def client(self):
        if self._client is None:
            raise RuntimeError("the store is not open")
        return self._client

    def _load(self, kb: str, drop_dead: bool = True) -> None:
        state = KBState(kb)
        c = self.client
        state.dim = vector_width(self.client, rows_name(kb))
        state.array_tags = array_tags(self.client, kb)
        c.load_collection(entries_name(kb))
        c.load_collection(rows_name(kb))
        if self.image_dim:
            if not c.has_collection(images_name(kb)):
                create_images(c, kb, self.image_dim)
            c.load_collection(images_name(kb))
            state.image_dim = vector_width(self.client, images_name(kb))
        self._read_entries(state)
        for collection in (rows_name(kb), images_name(kb) if self.image_dim else None):
            if collection and drop_dead:
                drop_dead_rows(self.client, collection, state.committed_row,
                               time.time_ns() - int(DEAD_ROW_AGE_S * 1e9))
        self._kbs[kb] = state

    def _read_entries(self, state: KBState) -> None:
        """Replaces ``committed`` with the entries in Milvus (the source of truth).

        A read that one of this process's own writes overlapped may have been taken before
        that write committed: it is read again (READ_TRIES times, then the entries this
        process wrote meanwhile are kept over what the read found), so a replica never
        answers with an entry older than one it wrote itself.
        """
        for attempt in range(READ_TRIES):
            writes = state.writes
            committed = scan_entries(self.client, state)
            with state.lock:
                if state.writes == writes or attempt == READ_TRIES - 1:
                    recent = state.written_since(writes)
                    for entry_id in recent:
                        if entry_id in state.committed:
                            committed[entry_id] = state.committed[entry_id]
                        else:
                            committed.pop(entry_id, None)
                    kept = {key_of(i) for i in recent}  # the others are as Milvus has them
                    state.unconfirmed = {k: v for k, v in state.unconfirmed.items() if k in kept}
                    state.revision += 1
                    state.committed = committed
                    state.ids = {key_of(i): i for i in committed}
                    state.revision += 1
                    return

    def _kb(self, kb: str, *, create: bool = False, vectors: str = "") -> KBState:
        """A knowledge base's state. ``vectors`` ("text" or "image"): the caller writes or
        searches those vectors, so they must be as wide as this process's model's."""
        state = self._kbs.get(kb)
        if state is not None:
            if vectors:
                state.check_width(self.dim, self.image_dim, vectors)
            return state
        if not create:
            raise UnknownKnowledgeBase(kb, self._kbs)
        with self._create_lock:
            if kb not in self._kbs:
                names = set(self.client.list_collections())
                if rows_name(kb) in names and entries_name(kb) in names:
                    self._load(kb)  # made by another replica since the last refresh
                else:
                    for name in (rows_name(kb), entries_name(kb), images_name(kb)):
                        if name in names:  # half made by a write that died
                            self.client.drop_collection(name)
                    create_collections(self.client, kb, self.dim, self.image_dim,
                                       lexical=self.lexical,
                                       tag_array=tags_as_array(self.uri))
                    self._kbs[kb] = KBState(kb, array_tags=tags_as_array(self.uri))
                    self._publish(kb, self._next_version())
            return self._kbs[kb]

    def _next_version(self) -> int:
        v = max(time.time_ns(), self._last_version + 1)
        self._last_version = v
        return v

    def _publish(self, kb: str, version: int) -> None:
        """Records a committed change of kb in supportqa_meta, for the other replicas."""
        self.client.upsert(META, [{"kb": kb, "revision": version, "unused": [0.0, 0.0]}])
        if kb in self._kbs:
            self._kbs[kb].published = version

    def _published(self) -> dict[str, int]:
        """knowledge base -> revision of its last committed change, as Milvus has it now."""
        rows = self.client.query(META, filter='kb != ""', output_fields=["kb", "revision"],
                                 consistency_level="Strong", timeout=POLL_TIMEOUT_S)
        return {r["kb"]: int(r["revision"]) for r in rows}

    def refresh(self) -> list[str]:
        """Catches up with writes of other replicas: loads knowledge bases made elsewhere and
        re-reads the entries of those whose revision in supportqa_meta moved. Returns the
        names of those that changed. A replica's own writes are seen at once; others' once
        this runs (every SUPPORTQA_STORE_POLL_SECONDS).
        """
        self._deletes.run()
        changed = []
        for kb, revision in sorted(self._published().items()):
            state = self._kbs.get(kb)
            if state is None:
                names = set(self.client.list_collections())
                if rows_name(kb) not in names or entries_name(kb) not in names:
                    continue  # being made
                with self._create_lock:
                    if kb not in self._kbs:
                        self._load(kb, drop_dead=False)
                state = self._kbs[kb]
            elif state.published == revision and (
                    not state.unconfirmed or own_writes_stand(self.client, state)):
                continue  # nothing new; or the revision is this replica's own, and it stands
            else:
                self._read_entries(state)
            state.published = revision
            changed.append(kb)
        if changed:
            log.info("caught up with other replicas' writes: %s", ", ".join(changed))
        return changed

    def reconnect(self) -> None:
        """Loads every collection again (a restarted Milvus may come back with them
        released)."""
        self.client.load_collection(META, timeout=LOAD_TIMEOUT_S)
        for kb in self._kbs:
            for name in (rows_name(kb), entries_name(kb)) + (
                    (images_name(kb),) if self.image_dim else ()):
                self.client.load_collection(name, timeout=LOAD_TIMEOUT_S)

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
            state.check_width(self.dim, self.image_dim, "image")
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
                        "tags": tags_field(e.tags, state.array_tags),
                        "locale": locale_field(e.locale),
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
            keys = sorted({key_of(e.id) for e in entries})
            # What this commit replaces, as Milvus has it now: another replica may have
            # written these entries since this one last read them.
            old = stored_versions(self.client, kb, keys)
            docs = [
                {"key": key_of(e.id), "version": version, "doc": e.to_json(),
                 "unused": [0.0, 0.0]}
                for e in entries
            ]
            for i in range(0, len(docs), INSERT_BATCH):
                c.upsert(entries_name(kb), docs[i : i + INSERT_BATCH])
            replaced = [e.id for e in entries if e.id in state.committed or key_of(e.id) in old]
            state.revision += 1
            for e in entries:
                state.committed[e.id] = (version, e)
                state.ids[key_of(e.id)] = e.id
            state.wrote(e.id for e in entries)
            if self.shared:
                state.unconfirmed.update((key_of(e.id), version) for e in entries)
            state.revision += 1
            self._publish(kb, version)
            # Only the rows of the versions replaced: rows of another replica's write in
            # flight (any other version) stay, and its commit finds them whole.
            self._deletes.later(kb, old, keep=version)
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
                old = stored_versions(self.client, kb, keys)
                quoted = ", ".join(map(literal, keys))
                c.delete(entries_name(kb), filter=f"key in [{quoted}]")
                state.revision += 1
                for x, k in zip(chunk, keys, strict=True):
                    state.committed.pop(x, None)
                    state.ids.pop(k, None)
                state.wrote(chunk)
                if self.shared:
                    state.unconfirmed.update((k, -1) for k in keys)
                state.revision += 1
                self._publish(kb, self._next_version())
                self._deletes.later(kb, old)
        return len(present), missing

    def get(self, kb: str, entry_id: str) -> EntryData:
        state = self._kb(kb)
        found = state.committed.get(entry_id)
        if found is None:
            raise NotFound(f"entry {entry_id!r} is not in knowledge base {kb!r}")
        return found[1]

    def ids(self, kb: str) -> list[str]:
        return sorted(self._kb(kb).committed)

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
    ) -> tuple[int, list[str], np.ndarray, list[str], list[str]] | None:
        """(revision, entry id per row, (rows, dim) text vectors, row texts, row kinds) of the
        committed entries, for the entry head (head.py) and the threshold's calibration;
        None when the knowledge base has more than ``max_rows`` rows.

        Read without the write lock: rows are kept only when their version is committed at
        the end, and a write during the read changes the revision, so the caller sees that
        what it trained on is already old.
        """
        state = self._kb(kb, vectors="text")
        revision = state.revision
        if state.rows > max_rows:
            return None
        labels, vecs, texts, kinds = [], [], [], []
        for batch in scan(self.client, rows_name(kb), ["pk", "vector", "text", "kind"]):
            live = [(r, row[0].id) for r in batch
                    if (row := state.committed_row(r["pk"])) is not None]
            labels += [entry_id for _, entry_id in live]
            live = [r for r, _ in live]
            texts += [r["text"] for r in live]
            kinds += [r["kind"] for r in live]
            # To float32 a batch at a time: as Python floats, 100k rows of 384 would take 1 GB.
            vecs.append(np.asarray([r["vector"] for r in live], np.float32).reshape(-1, self.dim))
        empty = np.zeros((0, self.dim), np.float32)
        return revision, labels, np.concatenate(vecs or [empty]), texts, kinds

    def counts(self, kb: str) -> tuple[int, int, int]:
        """(entries, text rows, image rows) of a knowledge base."""
        state = self._kb(kb)
        return len(state.committed), state.rows, state.image_rows


def scan_entries(client, state: KBState) -> dict[str, tuple[int, EntryData]]:
    """The committed entries of a knowledge base as Milvus has them now."""
    committed: dict[str, tuple[int, EntryData]] = {}
    for batch in scan(client, entries_name(state.name), ["key", "version", "doc"],
                      pk="key"):
        for r in batch:
            e = EntryData.from_json(r["doc"])
            committed[e.id] = (int(r["version"]), e)
    # Passage texts live in their rows: kept from memory where the version is the same,
    # else read back.
    unread: dict[str, int] = {}
    for entry_id, (version, e) in committed.items():
        if e.passages:
            known = state.committed.get(entry_id)
            if known is not None and known[0] == version and known[1].stored_text:
                committed[entry_id] = known
            else:
                unread[key_of(entry_id)] = version
    if unread:
        texts = passage_texts(client, state.name, unread)
        for entry_id, (version, e) in committed.items():
            if (key := key_of(entry_id)) in unread:
                committed[entry_id] = (version, e.with_passage_texts(texts.get(key, {})))
    return committed

def own_writes_stand(client, state: KBState) -> bool:
    """Whether Milvus still holds this process's own latest commits of a knowledge base as
    they were written (read at Strong consistency). Another replica's commit of the same
    entries may land after one's own and publish before it; the revision in supportqa_meta is
    then one's own, yet Milvus holds the other's entry. Confirmed commits are forgotten."""
    with state.lock:
        mine = dict(state.unconfirmed)
    found = stored_versions(client, state.name, sorted(mine))
    if any(found.get(key, -1) != version for key, version in mine.items()):
        return False
    with state.lock:
        for key, version in mine.items():
            if state.unconfirmed.get(key) == version:
                del state.unconfirmed[key]
    return True
