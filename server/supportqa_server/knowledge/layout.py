"""The Milvus collections of a knowledge base: their names and schemas, reading them whole,
and moving the layout before keys over. Functions of a pymilvus MilvusClient."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from supportqa_server.knowledge.entries import (
    KEY_HEX,
    MAX_DOC_BYTES,
    MAX_TAGS,
    MAX_TEXT_BYTES,
    TAG_KEY_HEX,
    EntryData,
    key_of,
    locale_field,
    row_pk,
    tags_field,
)

log = logging.getLogger(__name__)

INSERT_BATCH = 1000  # rows per insert: Milvus Lite 2.5 slows sharply on larger batches
PREFIX = "supportqa_"  # collections of this layout
LEGACY_PREFIX = "sqa_"  # collections of the layout before keys, moved over on open


def rows_name(kb: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{kb}_rows"


def entries_name(kb: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{kb}_entries"


def images_name(kb: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{kb}_images"



def scan(client, collection: str, fields: list[str], batch_size: int = 1000
          ) -> Iterator[list[dict]]:
    """Every row of a collection, ``fields`` only, in batches (a Milvus query returns at
    most 16,384 rows, so larger reads go through its iterator)."""
    it = client.query_iterator(
        collection, batch_size=batch_size, filter="version >= 0", output_fields=fields
    )
    try:
        while batch := it.next():
            yield batch
    finally:
        it.close()


def move_legacy(client, kb: str, names: set[str], *, dim: int, lexical: bool) -> None:
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
    for batch in scan(c, old_entries, ["version", "doc"]):
        for r in batch:
            e = EntryData.from_json(r["doc"])
            committed[e.id] = (int(r["version"]), r["doc"], e)
    # The new collections keep the old vectors' widths, whatever this server's models.
    image_dim = vector_width(c, old_images) if old_images in names else 0
    create_collections(c, kb, vector_width(c, old_rows) or dim, image_dim, lexical=lexical)
    moved = 0
    for old, new, fields in (
        (old_rows, rows_name(kb), ["pk", "kind", "text", "vector"]),
        (old_images, images_name(kb), ["pk", "vector"]),
    ):
        if old not in names:
            continue
        for batch in scan(c, old, fields, INSERT_BATCH):
            rows = []
            for r in batch:
                entry_id, version, index = r.pop("pk").split("\x1f")
                if committed.get(entry_id, (None,))[0] != int(version):
                    continue
                e = committed[entry_id][2]
                r.update(pk=row_pk(key_of(entry_id), int(version), int(index)),
                         entry_key=key_of(entry_id), version=int(version))
                if "text" in r:
                    r.update(tags=tags_field(e.tags), locale=locale_field(e.locale))
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


def create_collections(client, kb: str, dim: int, image_dim: int, *, lexical: bool) -> None:
    """A knowledge base's collections, for text vectors of ``dim`` and, when
    ``image_dim``, CLIP vectors of that width."""
    from pymilvus import DataType, Function, FunctionType, MilvusClient

    c = client
    rows = row_schema()
    rows.add_field("kind", DataType.VARCHAR, max_length=16)
    rows.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True)
    rows.add_field("tags", DataType.VARCHAR, max_length=MAX_TAGS * (TAG_KEY_HEX + 1) + 1)
    rows.add_field("locale", DataType.VARCHAR, max_length=TAG_KEY_HEX)
    rows.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index = c.prepare_index_params()
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
    c.create_collection(
        rows_name(kb), schema=rows, index_params=index, consistency_level="Strong"
    )
    entries = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    entries.add_field("key", DataType.VARCHAR, is_primary=True, max_length=KEY_HEX)
    entries.add_field("version", DataType.INT64)
    entries.add_field("doc", DataType.VARCHAR, max_length=MAX_DOC_BYTES)
    entries.add_field("unused", DataType.FLOAT_VECTOR, dim=2)  # Milvus requires a vector
    eindex = c.prepare_index_params()
    eindex.add_index("unused", index_type="FLAT", metric_type="L2")
    c.create_collection(
        entries_name(kb), schema=entries, index_params=eindex, consistency_level="Strong"
    )
    if image_dim:
        create_images(c, kb, image_dim)

def vector_width(client, collection: str) -> int:
    """The width of a collection's `vector` field (0 when it has none)."""
    fields = client.describe_collection(collection).get("fields", [])
    return next((int(f.get("params", {}).get("dim", 0)) for f in fields
                 if f.get("name") == "vector"), 0)

