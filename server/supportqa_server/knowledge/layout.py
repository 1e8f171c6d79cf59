"""The Milvus collections of a knowledge base: their names and schemas, reading them whole,
and moving the layout before keys over. Functions of a pymilvus MilvusClient."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence

from supportqa_server.knowledge.entries import (
    KEY_HEX,
    MAX_DOC_BYTES,
    MAX_TAGS,
    MAX_TEXT_BYTES,
    TAG_KEY_HEX,
    EntryData,
    key_of,
    literal,
    locale_field,
    row_pk,
    tags_field,
)

log = logging.getLogger(__name__)

_PK_RE = re.compile(r"[0-9a-f.]+")
INSERT_BATCH = 1000  # rows per insert: Milvus Lite 2.5 slows sharply on larger batches
PREFIX = "supportqa_"  # collections of this layout
LEGACY_PREFIX = "sqa_"  # collections of the layout before keys, moved over on open


def rows_name(kb: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{kb}_rows"


def entries_name(kb: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{kb}_entries"


META = "supportqa_meta"  # revisions of every knowledge base, shared by replicas


def images_name(kb: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{kb}_images"



def scan(client, collection: str, fields: list[str], batch_size: int = 1000, *, pk: str = "pk",
         where: str = "version >= 0") -> Iterator[list[dict]]:
    """Every row of a collection (that matches ``where``), ``fields`` (which hold its primary
    key ``pk``) only, in batches of primary keys in order. (pymilvus's query_iterator fails on
    Milvus Lite 2.5 collections with an ARRAY field; its paging by primary key is done here.)"""
    last = None
    while True:
        expr = where if last is None else f'{where} and {pk} > "{last}"'
        batch = sorted(query(client, collection, filter=expr, output_fields=fields,
                             limit=batch_size, consistency_level="Strong"),
                       key=lambda r: r[pk])
        if not batch:
            return
        yield batch
        last = batch[-1][pk]
        if not _PK_RE.fullmatch(last):  # our keys only: hex digits, dots and digits
            raise ValueError(f"{collection}: unexpected primary key {last[:40]!r}")
        if len(batch) < batch_size:
            return


def query(client, collection: str, **kwargs) -> list[dict]:
    """client.query, where an empty result is [] (Milvus Lite 2.5.1 answers a query that
    matches nothing in a collection with an ARRAY field with an ARRAY of no element type,
    which pymilvus 2.5 cannot read)."""
    from pymilvus.exceptions import MilvusException

    try:
        return list(client.query(collection, **kwargs))
    except MilvusException as e:
        if "Unsupported data type: 0" in str(e):
            return []
        raise


def scan_legacy(client, collection: str, fields: list[str], batch_size: int = 1000
                ) -> Iterator[list[dict]]:
    """scan for the layout before keys, whose primary keys hold callers' ids (no ARRAY
    fields there, so pymilvus's iterator works)."""
    it = client.query_iterator(
        collection, batch_size=batch_size, filter="version >= 0", output_fields=fields
    )
    try:
        while batch := it.next():
            yield batch
    finally:
        it.close()


def is_server(uri: str) -> bool:
    """Whether a store URI names a Milvus server (else a Milvus Lite file)."""
    return uri.startswith(("http://", "https://", "tcp://", "unix:"))


def tags_as_array(uri: str) -> bool:
    """How a store keeps tag keys. On a Milvus server as an ARRAY, filtered with
    `array_contains_any`: Milvus 2.3 takes only prefix patterns in `like`. In a Milvus Lite
    2.5.1 file as "|k1|k2|" text, filtered with `like`: there `array_contains_any` fails on
    a collection read back from disk ("index out of range")."""
    return is_server(uri)


def move_legacy(client, kb: str, names: set[str], *, dim: int, lexical: bool,
                tag_array: bool) -> None:
    """Moves a knowledge base of the layout before keys (raw ids in primary keys and
    expressions) into this one: committed entries and their rows, vectors kept, then drops
    the old collections. Until they are dropped the move is redone from the start, so a
    move cut short loses nothing."""
    c = client
    for name in (rows_name(kb), entries_name(kb), images_name(kb)):
        if name in names:
            c.drop_collection(name)
    old_rows, old_entries = rows_name(kb, LEGACY_PREFIX), entries_name(kb, LEGACY_PREFIX)
    old_images = images_name(kb, LEGACY_PREFIX)
    for name in (old_rows, old_entries) + ((old_images,) if old_images in names else ()):
        c.load_collection(name)
    committed: dict[str, tuple[int, str, EntryData]] = {}  # id -> (version, doc, entry)
    for batch in scan_legacy(c, old_entries, ["version", "doc"]):
        for r in batch:
            e = EntryData.from_json(r["doc"])
            committed[e.id] = (int(r["version"]), r["doc"], e)
    # The new collections keep the old vectors' widths, whatever this server's models.
    image_dim = vector_width(c, old_images) if old_images in names else 0
    create_collections(c, kb, vector_width(c, old_rows) or dim, image_dim, lexical=lexical,
                       tag_array=tag_array)
    moved = 0
    for old, new, fields in (
        (old_rows, rows_name(kb), ["pk", "kind", "text", "vector"]),
        (old_images, images_name(kb), ["pk", "vector"]),
    ):
        if old not in names:
            continue
        for batch in scan_legacy(c, old, fields, INSERT_BATCH):
            rows = []
            for r in batch:
                entry_id, version, index = r.pop("pk").split("\x1f")
                if committed.get(entry_id, (None,))[0] != int(version):
                    continue
                e = committed[entry_id][2]
                r.update(pk=row_pk(key_of(entry_id), int(version), int(index)),
                         entry_key=key_of(entry_id), version=int(version))
                if "text" in r:
                    r.update(tags=tags_field(e.tags, tag_array), locale=locale_field(e.locale))
                rows.append(r)
            if rows:
                c.insert(new, rows)
                moved += len(rows)
    docs = [{"key": key_of(i), "version": v, "doc": d, "unused": [0.0, 0.0]}
            for i, (v, d, _) in committed.items()]
    for i in range(0, len(docs), INSERT_BATCH):
        c.insert(entries_name(kb), docs[i : i + INSERT_BATCH])
    for name in (old_rows, old_entries, old_images):
        if name in names:
            c.drop_collection(name)
    log.warning("knowledge base %r: moved %d entries and %d rows to the keyed layout",
                kb, len(committed), moved)

def row_schema():
    """The fields every row collection starts with: its key and its entry's key and
    version."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=128)
    schema.add_field("entry_key", DataType.VARCHAR, max_length=KEY_HEX)
    schema.add_field("version", DataType.INT64)
    return schema


def create_images(client, kb: str, image_dim: int) -> None:
    from pymilvus import DataType

    c = client
    schema = row_schema()
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=image_dim)
    index = c.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="IP")
    c.create_collection(
        images_name(kb), schema=schema, index_params=index, consistency_level="Strong"
    )


def create_collections(client, kb: str, dim: int, image_dim: int, *, lexical: bool,
                       tag_array: bool) -> None:
    """A knowledge base's collections, for text vectors of ``dim`` and, when ``image_dim``,
    CLIP vectors of that width; tag keys as an ARRAY when ``tag_array``, else as "|k1|k2|"
    text. All or none: a failure drops what it made, so a later try starts clean (a
    half-made pair would refuse every later create)."""
    made: list[str] = []
    try:
        _create_rows(client, kb, dim, lexical, tag_array, made)
        _create_entries(client, kb, made)
        if image_dim:
            create_images(client, kb, image_dim)
            made.append(images_name(kb))
    except Exception:
        for name in made + [rows_name(kb)]:
            try:
                client.drop_collection(name)
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                log.warning("could not drop %s after a failed create", name)
        raise


def _create_rows(client, kb: str, dim: int, lexical: bool, tag_array: bool,
                 made: list[str]) -> None:
    from pymilvus import DataType, Function, FunctionType

    rows = row_schema()
    rows.add_field("kind", DataType.VARCHAR, max_length=16)
    rows.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES,
                   **({"enable_analyzer": True} if lexical else {}))
    if tag_array:
        rows.add_field("tags", DataType.ARRAY, element_type=DataType.VARCHAR,
                       max_capacity=MAX_TAGS, max_length=TAG_KEY_HEX)
    else:
        rows.add_field("tags", DataType.VARCHAR, max_length=MAX_TAGS * (TAG_KEY_HEX + 1) + 1)
    rows.add_field("locale", DataType.VARCHAR, max_length=TAG_KEY_HEX)
    rows.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="IP")  # unit vectors: cosine
    if lexical:
        rows.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        rows.add_function(
            Function(
                name="bm25", function_type=FunctionType.BM25,
                input_field_names=["text"], output_field_names=["sparse"],
            )
        )
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    client.create_collection(
        rows_name(kb), schema=rows, index_params=index, consistency_level="Strong"
    )
    made.append(rows_name(kb))


def _create_entries(client, kb: str, made: list[str]) -> None:
    from pymilvus import DataType, MilvusClient

    entries = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    entries.add_field("key", DataType.VARCHAR, is_primary=True, max_length=KEY_HEX)
    entries.add_field("version", DataType.INT64)
    entries.add_field("doc", DataType.VARCHAR, max_length=MAX_DOC_BYTES)
    entries.add_field("unused", DataType.FLOAT_VECTOR, dim=2)  # Milvus requires a vector
    eindex = client.prepare_index_params()
    eindex.add_index("unused", index_type="FLAT", metric_type="L2")
    client.create_collection(
        entries_name(kb), schema=entries, index_params=eindex, consistency_level="Strong"
    )
    made.append(entries_name(kb))


def create_meta(client) -> None:
    """`supportqa_meta`: per knowledge base, the version of its last committed change. Every
    replica on one Milvus polls it to learn of the others' writes."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("kb", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("revision", DataType.INT64)
    schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)  # Milvus requires a vector
    index = client.prepare_index_params()
    index.add_index("unused", index_type="FLAT", metric_type="L2")
    client.create_collection(META, schema=schema, index_params=index, consistency_level="Strong")


def stored_versions(client, kb: str, keys: Sequence[str]) -> dict[str, int]:
    """entry key -> committed version in Milvus (read at Strong consistency)."""
    out: dict[str, int] = {}
    for i in range(0, len(keys), INSERT_BATCH):
        chunk = ", ".join(map(literal, keys[i : i + INSERT_BATCH]))
        for r in client.query(entries_name(kb), filter=f"key in [{chunk}]",
                                   output_fields=["key", "version"],
                                   consistency_level="Strong"):
            out[r["key"]] = int(r["version"])
    return out


def passage_texts(client, kb: str, versions: dict[str, int]) -> dict[str, dict[int, str]]:
    """entry key -> {row index: text} of the passage rows of entry key -> version pairs."""
    out: dict[str, dict[int, str]] = {}
    keys = sorted(versions)
    for i in range(0, len(keys), INSERT_BATCH):
        chunk = ", ".join(map(literal, keys[i : i + INSERT_BATCH]))
        for batch in scan(client, rows_name(kb), ["pk", "text"],
                          where=f'kind == "passage" and entry_key in [{chunk}]'):
            for r in batch:
                key, version, index = r["pk"].split(".")
                if versions.get(key) == int(version):
                    out.setdefault(key, {})[int(index)] = r["text"]
    return out


def drop_dead_rows(client, collection: str, committed_row, cutoff_ns: int) -> None:
    """Deletes rows whose version is not their entry's committed one (``committed_row(pk)``
    is None) and that were written before ``cutoff_ns``: a write that died. Younger ones may
    be another replica's write in flight."""
    dead: list[str] = []
    for batch in scan(client, collection, ["pk", "version"]):
        dead += [r["pk"] for r in batch
                 if r["version"] < cutoff_ns and committed_row(r["pk"]) is None]
    if dead:
        log.warning("%s: removing %d rows of unfinished writes", collection, len(dead))
    for i in range(0, len(dead), INSERT_BATCH):
        client.delete(collection, ids=dead[i : i + INSERT_BATCH])


def delete_rows(client, kb: str, versions: dict[str, int], *, keep: int = -1,
                images: bool) -> None:
    """Deletes the rows of entry key -> version pairs (never of version ``keep``)."""
    by_version: dict[int, list[str]] = {}
    for key, v in versions.items():
        if v != keep:
            by_version.setdefault(v, []).append(key)
    for v, keys in by_version.items():
        for i in range(0, len(keys), INSERT_BATCH):
            chunk = ", ".join(map(literal, keys[i : i + INSERT_BATCH]))
            expr = f"entry_key in [{chunk}] and version == {v}"
            client.delete(rows_name(kb), filter=expr)
            if images:
                client.delete(images_name(kb), filter=expr)


class RowDeletes:
    """Deletes replaced rows (delete_rows) at once, or ``delay_s`` later when ``run`` is
    called after that (each replica's poll)."""

    def __init__(self, client, images: bool, delay_s: float) -> None:
        self.client, self.images, self.delay_s = client, images, delay_s
        self._due: list[tuple[float, str, dict[str, int], int]] = []  # (at, kb, old, keep)
        self._lock = threading.Lock()  # writes add from store threads, polls take

    def later(self, kb: str, versions: dict[str, int], *, keep: int = -1) -> None:
        if self.delay_s <= 0:
            delete_rows(self.client, kb, versions, keep=keep, images=self.images)
        else:
            with self._lock:
                self._due.append((time.monotonic() + self.delay_s, kb, versions, keep))

    def run(self, everything: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            due = [d for d in self._due if everything or d[0] <= now]
            self._due = [d for d in self._due if d not in due]
        for _, kb, versions, keep in due:
            delete_rows(self.client, kb, versions, keep=keep, images=self.images)


def array_tags(client, kb: str) -> bool:
    """Whether a knowledge base's rows keep tag keys as an ARRAY (else as "|k1|k2|" text)."""
    fields = client.describe_collection(rows_name(kb)).get("fields", [])
    from pymilvus import DataType

    return any(f.get("name") == "tags" and f.get("type") == DataType.ARRAY for f in fields)


def server_has_bm25(client, uri: str) -> tuple[bool, str]:
    """(whether the server runs Milvus's BM25 function, its version). Milvus Lite files do;
    a server does from 2.5 (2.3 accepts a BM25 schema and silently drops the function)."""
    if not is_server(uri):
        return True, "lite"
    version = str(client.get_server_version())
    found = re.match(r"v?(\d+)\.(\d+)", version)
    if found is None:
        return True, version  # not a version we can read: a newer server, presumably
    return (int(found[1]), int(found[2])) >= (2, 5), version


def vector_width(client, collection: str) -> int:
    """The width of a collection's `vector` field (0 when it has none)."""
    fields = client.describe_collection(collection).get("fields", [])
    return next((int(f.get("params", {}).get("dim", 0)) for f in fields
                 if f.get("name") == "vector"), 0)

