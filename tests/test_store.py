"""KnowledgeStore on a real Milvus Lite in tmp_path: versions, stale rows, recovery, filters."""

from __future__ import annotations

import numpy as np
import pytest
from supportqa_server.errors import NotFound, WrongModel
from supportqa_server.knowledge import store as store_module
from supportqa_server.knowledge.store import READ_TRIES, EntryData, KnowledgeStore, key_of

DIM = 8


def vec(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i % DIM] = 1.0
    return v


def vectors(e: EntryData, axis: int) -> np.ndarray:
    return np.stack([vec(axis) for _ in e.texts()])


@pytest.fixture
def store(tmp_path):
    s = KnowledgeStore(str(tmp_path / "milvus.db"), DIM)
    s.open()
    yield s
    s.close()


def ids(hits):
    return [h.entry_id for h in hits]


def test_texts_are_title_paraphrases_answer_without_duplicates():
    e = EntryData(id="x", title="Reset PIN", answer="Go to Cards.",
                  questions=("reset pin", "How do I reset my PIN?", " "))
    assert e.texts() == [("title", "Reset PIN"), ("question", "How do I reset my PIN?"),
                         ("answer", "Go to Cards.")]


def test_unknown_knowledge_base_is_not_found(store):
    with pytest.raises(NotFound, match="does not exist"):
        store.counts("nope")


def test_replace_removes_old_rows_and_counts_follow(store):
    a1 = EntryData(id="a", title="alpha", answer="first", questions=("q1", "q2"))
    b = EntryData(id="b", title="beta", answer="other")
    assert store.upsert("kb", [a1, b], [vectors(a1, 0), vectors(b, 1)]) == (0, 6)
    assert store.counts("kb") == (2, 6, 0)
    a2 = EntryData(id="a", title="alpha two", answer="second")
    assert store.upsert("kb", [a2], [vectors(a2, 2)]) == (1, 2)
    assert store.counts("kb") == (2, 4, 0)
    (dense, _), = store.search("kb", np.stack([vec(0)]), ["q1"], limit=50)
    assert "a" not in ids([h for h in dense if h.score > 0.5])  # old vectors pointed at axis 0
    (dense, _), = store.search("kb", np.stack([vec(2)]), ["alpha"], limit=50)
    assert dense[0].entry_id == "a" and dense[0].text in ("alpha two", "second")
    left = store.client.query("supportqa_kb_rows", filter=f'entry_key == "{key_of("a")}"',
                              output_fields=["text"])
    assert sorted(r["text"] for r in left) == ["alpha two", "second"]


def test_uncommitted_rows_are_invisible_and_removed_on_reopen(tmp_path):
    path = str(tmp_path / "milvus.db")
    s = KnowledgeStore(path, DIM)
    s.open()
    a = EntryData(id="a", title="alpha", answer="kept")
    s.upsert("kb", [a], [vectors(a, 0)])
    # A writer that died after inserting rows of a new version, before its commit point:
    s.client.insert("supportqa_kb_rows", [{
        "pk": f"{key_of('a')}.999.0", "entry_key": key_of("a"), "version": 999, "kind": "question",
        "text": "half written paraphrase", "tags": "", "locale": "", "vector": vec(5).tolist(),
    }])
    (dense, lex), = s.search("kb", np.stack([vec(5)]), ["half written paraphrase"], limit=50)
    assert "half written paraphrase" not in [h.text for h in dense + lex]
    s.close()

    s2 = KnowledgeStore(path, DIM)
    s2.open()
    assert s2.get("kb", "a").answer == "kept"
    left = s2.client.query("supportqa_kb_rows", filter="version == 999",
                           output_fields=["count(*)"])
    assert left[0]["count(*)"] == 0
    assert s2.counts("kb") == (1, 2, 0)
    s2.close()


def test_filters_by_tag_and_locale(store):
    card = EntryData(id="card", title="card", answer="c", tags=("cards", "security"),
                     locale="en-GB")
    loan = EntryData(id="loan", title="loan", answer="l", tags=("loans",), locale="de-DE")
    anywhere = EntryData(id="any", title="any", answer="a")
    store.upsert("kb", [card, loan, anywhere],
                 [vectors(card, 0), vectors(loan, 0), vectors(anywhere, 0)])
    q = np.stack([vec(0)])
    (dense, _), = store.search("kb", q, ["x"], limit=50, tags=("security",))
    assert set(ids(dense)) == {"card"}
    (dense, _), = store.search("kb", q, ["x"], limit=50, locale="de-DE")
    assert set(ids(dense)) == {"loan", "any"}


def test_tag_filters_match_tags_exactly_even_with_like_wildcards(store):
    """Milvus's like cannot escape % and _: a filter on "card_a" must still not match "cardXa"
    nor "%" match every tag; a tag holding "|" (stored as "/") must still match itself."""
    entries = [EntryData(id=t, title=t, answer="x", tags=(t,))
               for t in ("card_a", "cardXa", "a|b", "plain")]
    store.upsert("kb", entries, [vectors(e, 0) for e in entries])
    q = np.stack([vec(0)])
    for tags, want in ((("card_a",), {"card_a"}), (("%",), set()), (("a|b",), {"a|b"}),
                       (("card_a", "plain"), {"card_a", "plain"})):
        (dense, lex), = store.search("kb", q, ["card"], limit=50, tags=tags)
        assert set(ids(dense)) == want, tags
        assert set(ids(lex)) <= want, tags


def test_lexical_route_finds_exact_error_code(store):
    e1 = EntryData(id="e4012", title="Error 4012: Card declined by issuer", answer="call bank")
    e2 = EntryData(id="e503", title="Error 503: Service temporarily unavailable", answer="wait")
    store.upsert("kb", [e1, e2], [vectors(e1, 0), vectors(e2, 0)])
    (_, lex), = store.search("kb", np.stack([vec(0)]), ["what is 4012"], limit=10)
    assert lex and lex[0].entry_id == "e4012"


def test_row_hits_found_before_a_write_are_dropped_after_it(store):
    """Searches remember which row keys are live; a write must make them ask again."""
    a1 = EntryData(id="a", title="alpha", answer="first")
    store.upsert("kb", [a1], [vectors(a1, 0)])
    (dense, _), = store.search("kb", np.stack([vec(0)]), ["alpha"], limit=10)
    assert {h.text for h in dense} == {"alpha", "first"}
    state = store._kbs["kb"]
    old_key = f"{key_of('a')}.{state.committed['a'][0]}.0"
    assert [h.text for h in state.live([(old_key, 0.9)])] == ["alpha"]
    a2 = EntryData(id="a", title="alpha two", answer="second")
    store.upsert("kb", [a2], [vectors(a2, 0)])
    # Milvus may still send a row of the replaced version: it no longer counts
    assert state.live([(old_key, 0.9)]) == []
    new_key = f"{key_of('a')}.{state.committed['a'][0]}.0"
    assert [h.text for h in state.live([(new_key, 0.9)])] == ["alpha two"]
    store.delete("kb", ["a"])
    assert state.live([(new_key, 0.9)]) == []


def test_delete_reports_missing(store):
    a = EntryData(id="a", answer="x")
    store.upsert("kb", [a], [vectors(a, 0)])
    assert store.delete("kb", ["a", "zzz"]) == (1, ["zzz"])
    assert store.counts("kb") == (0, 0, 0)
    with pytest.raises(NotFound):
        store.get("kb", "a")


def test_image_rows_follow_versions(tmp_path):
    s = KnowledgeStore(str(tmp_path / "milvus.db"), DIM, image_dim=4)
    s.open()
    e1 = EntryData(id="a", title="dialog", answer="x", image_count=1, see_rows=3)
    see = np.eye(4, dtype=np.float32)[:3]  # image -> axis 0, texts -> axes 1, 2
    s.upsert("kb", [e1], [vectors(e1, 0)], [see])
    assert s.counts("kb") == (1, 2, 3)
    (hits,) = s.search_images("kb", np.eye(4, dtype=np.float32)[:1], limit=10)
    assert hits[0].entry_id == "a" and hits[0].kind == "image" and hits[0].score > 0.99
    e2 = EntryData(id="a", title="dialog", answer="x", image_count=0, see_rows=2)
    s.upsert("kb", [e2], [vectors(e2, 0)], [np.eye(4, dtype=np.float32)[2:4]])
    (hits,) = s.search_images("kb", np.eye(4, dtype=np.float32)[:1], limit=10)
    assert all(h.kind != "image" for h in hits)  # the old picture no longer matches
    assert s.counts("kb") == (1, 2, 2)
    s.close()


def test_raw_replies_read_as_pymilvus_reads_them(store):
    """The search reply's flat arrays, read without pymilvus's per-hit objects, give the same
    keys and scores as MilvusClient.search, on both routes and for several queries."""
    from pymilvus.exceptions import MilvusException
    from supportqa_server.knowledge.client import read_hits as _read_hits

    rng = np.random.default_rng(3)
    entries = [EntryData(id=f"e{i}", title=f"title {i}", answer=f"answer number {i}",
                         questions=(f"question {i} about cards", f"refund {i} pending"))
               for i in range(6)]
    store.upsert("kb", entries, [rng.normal(size=(len(e.texts()), DIM)).astype(np.float32)
                                 for e in entries])
    queries = rng.normal(size=(3, DIM)).astype(np.float32)
    for data, field, metric in (([q.tolist() for q in queries], "vector", "IP"),
                                (["refund 3 pending", "cards", "nothing matches"], "sparse",
                                 "BM25")):
        mine = _read_hits(store._send_search("supportqa_kb_rows", data, field, 7, "", metric), 3)
        theirs = store.client.search("supportqa_kb_rows", data=data, anns_field=field, limit=7,
                                     search_params={"metric_type": metric})
        assert [[pk for pk, _ in hits] for hits in mine] == [
            [h["id"] for h in hits] for hits in theirs]
        for hits, ref in zip(mine, theirs, strict=True):
            assert [s for _, s in hits] == pytest.approx([h["distance"] for h in ref])
    assert len(mine[0]) > 0 and mine[2] == []  # BM25: no shared word, no row
    with pytest.raises(MilvusException):
        _read_hits(
            store._send_search("supportqa_nope_rows", [[0.0] * DIM], "vector", 3, "", "IP"), 1
        )


def test_a_knowledge_base_written_by_another_text_model_says_so(tmp_path):
    """Reopened by a server whose text model is wider: searches and writes of text vectors
    fail with what to do, while BM25, reads and deletes still work."""
    path = str(tmp_path / "milvus.db")
    s = KnowledgeStore(path, DIM)
    s.open()
    a = EntryData(id="a", title="alpha", answer="kept")
    s.upsert("kb", [a], [vectors(a, 0)])
    s.close()
    wide = KnowledgeStore(path, DIM * 2)
    wide.open()
    try:
        with pytest.raises(WrongModel, match=r"written with 8-d text vectors.*gives 16-d"):
            wide.search("kb", np.zeros((1, DIM * 2), dtype=np.float32), ["x"], limit=5)
        b = EntryData(id="b", title="beta", answer="new")
        with pytest.raises(WrongModel, match="fresh SUPPORTQA_DATA_DIR"):
            wide.upsert("kb", [b], [np.zeros((len(b.texts()), DIM * 2), dtype=np.float32)])
        (_, lexical), = wide.search("kb", None, ["alpha"], limit=5)
        assert ids(lexical) == ["a"]
        assert wide.get("kb", "a").answer == "kept"
        assert wide.counts("kb") == (1, 2, 0)
        # a knowledge base it creates itself is as wide as its model
        wide.upsert("new", [b], [np.zeros((len(b.texts()), DIM * 2), dtype=np.float32)])
    finally:
        wide.close()


def test_a_knowledge_base_written_by_another_clip_model_says_so(tmp_path):
    path = str(tmp_path / "milvus.db")
    s = KnowledgeStore(path, DIM, image_dim=4)
    s.open()
    e = EntryData(id="a", title="dialog", answer="x", image_count=1, see_rows=3)
    s.upsert("kb", [e], [vectors(e, 0)], [np.eye(4, dtype=np.float32)[:3]])
    s.close()
    other = KnowledgeStore(path, DIM, image_dim=6)
    other.open()
    try:
        with pytest.raises(WrongModel, match=r"4-d image vectors.*6-d.*SUPPORTQA_CLIP_MODEL"):
            other.search_images("kb", np.eye(6, dtype=np.float32)[:1], limit=5)
        with pytest.raises(WrongModel, match="image vectors"):
            other.upsert("kb", [e], [vectors(e, 0)], [np.eye(6, dtype=np.float32)[:3]])
        (dense, _), = other.search("kb", np.stack([vec(0)]), ["dialog"], limit=5)
        assert set(ids(dense)) == {"a"}  # the text route is unaffected
    finally:
        other.close()


def test_text_vectors_are_the_committed_rows_and_their_entries(store):
    a1 = EntryData(id="a", title="alpha", answer="first", questions=("q1",))
    b = EntryData(id="b", title="beta", answer="other")
    store.upsert("kb", [a1, b], [vectors(a1, 0), vectors(b, 1)])
    a2 = EntryData(id="a", title="alpha two", answer="second")
    store.upsert("kb", [a2], [vectors(a2, 2)])
    revision, labels, vecs, texts, kinds = store.text_vectors("kb", max_rows=100)
    assert revision == store.revision("kb")
    assert sorted(labels) == ["a", "a", "b", "b"]  # a's three old rows are gone
    assert sorted(zip(labels, texts, strict=True)) == [
        ("a", "alpha two"), ("a", "second"), ("b", "beta"), ("b", "other")]
    assert sorted(zip(texts, kinds, strict=True))[:2] == [("alpha two", "title"),
                                                          ("beta", "title")]
    assert vecs.shape == (4, DIM) and vecs.dtype == np.float32
    for label, v in zip(labels, vecs, strict=True):
        assert np.argmax(v) == (2 if label == "a" else 1)  # each row its own entry's vector
    assert store.text_vectors("kb", max_rows=3) is None  # over the limit: no head


NASTY_IDS = [
    "x') OR ('1'='1", 'x") or ("1"=="1', "a','b", "can't-login", 'say "hi"', "line\nbreak",
    "back\\slash\\", "emoji 🙂 id", 'entry_id > "z', "%_*", "  spaced  ", "nul\x00byte",
    "a\x1fb", "ключ", "]) or true or ([",
]


def test_crafted_ids_round_trip_and_survive_a_reopen(tmp_path):
    """Ids that were expression fragments, quotes, newlines or control characters are data:
    each is written, read, searched and deleted as itself, never touches another entry, and
    the store opens again with all of them."""
    path = str(tmp_path / "milvus.db")
    s = KnowledgeStore(path, DIM)
    s.open()
    plain = [EntryData(id=i, title=i, answer=f"answer {i}") for i in ("a", "b", "1")]
    nasty = [EntryData(id=i, title=f"t{n}", answer=f"answer {n}", tags=(i,), locale=i[:32])
             for n, i in enumerate(NASTY_IDS)]
    s.upsert("kb", plain + nasty, [vectors(e, n) for n, e in enumerate(plain + nasty)])
    assert s.upsert("kb", nasty, [vectors(e, 3) for e in nasty]) == (len(nasty), 2 * len(nasty))
    assert s.delete("kb", ["a','b", "x') OR ('1'='1"]) == (2, [])
    kept = [e for e in plain + nasty if e.id not in ("a','b", "x') OR ('1'='1")]
    for e in kept:
        assert s.get("kb", e.id) == e
    (dense, _), = s.search("kb", np.stack([vec(3)]), ["x"], limit=100, tags=("line\nbreak",),
                           locale="line\nbreak")
    assert ids(dense) == ["line\nbreak", "line\nbreak"]
    revision, labels, vecs, _, _ = s.text_vectors("kb", 10_000)
    assert set(labels) == {e.id for e in kept} and len(vecs) == 2 * len(kept)
    s.close()

    s2 = KnowledgeStore(path, DIM)
    s2.open()
    assert s2.counts("kb") == (len(kept), 2 * len(kept), 0)
    for e in kept:
        assert s2.get("kb", e.id) == e
    assert s2.delete("kb", [e.id for e in kept]) == (len(kept), [])
    assert s2.counts("kb") == (0, 0, 0)
    s2.close()


def test_a_knowledge_base_of_the_layout_before_keys_is_moved_over(tmp_path):
    """Collections written before entry keys (raw ids in primary keys) are read into the keyed
    layout on open: committed rows with their vectors, uncommitted ones left behind."""
    from pymilvus import DataType, MilvusClient

    path = str(tmp_path / "milvus.db")
    c = MilvusClient(uri=path)
    rows = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    rows.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=512)
    rows.add_field("entry_id", DataType.VARCHAR, max_length=256)
    rows.add_field("version", DataType.INT64)
    rows.add_field("kind", DataType.VARCHAR, max_length=16)
    rows.add_field("text", DataType.VARCHAR, max_length=8192)
    rows.add_field("tags", DataType.VARCHAR, max_length=2048)
    rows.add_field("locale", DataType.VARCHAR, max_length=32)
    rows.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    index = c.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="IP")
    c.create_collection("sqa_old_rows", schema=rows, index_params=index)
    entries = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    entries.add_field("entry_id", DataType.VARCHAR, is_primary=True, max_length=256)
    entries.add_field("version", DataType.INT64)
    entries.add_field("doc", DataType.VARCHAR, max_length=65535)
    entries.add_field("unused", DataType.FLOAT_VECTOR, dim=2)
    eindex = c.prepare_index_params()
    eindex.add_index("unused", index_type="FLAT", metric_type="L2")
    c.create_collection("sqa_old_entries", schema=entries, index_params=eindex)
    e = EntryData(id="card-lost", title="Lost card", answer="Freeze it.", tags=("cards",))
    c.insert("sqa_old_rows", [
        {"pk": f"card-lost\x1f7\x1f{i}", "entry_id": "card-lost", "version": 7, "kind": k,
         "text": t, "tags": "|cards|", "locale": "", "vector": vec(i).tolist()}
        for i, (k, t) in enumerate(e.texts())
    ] + [{"pk": "card-lost\x1f9\x1f0", "entry_id": "card-lost", "version": 9, "kind": "title",
          "text": "never committed", "tags": "", "locale": "", "vector": vec(5).tolist()}])
    c.insert("sqa_old_entries", [{"entry_id": "card-lost", "version": 7, "doc": e.to_json(),
                                  "unused": [0.0, 0.0]}])
    c.close()

    s = KnowledgeStore(path, DIM)
    s.open()
    assert s.get("old", "card-lost") == e
    assert s.counts("old") == (1, 2, 0)
    (dense, _), = s.search("old", np.stack([vec(1)]), ["freeze"], limit=10, tags=("cards",))
    assert dense[0].entry_id == "card-lost" and dense[0].text == "Freeze it."
    assert not any(n.startswith("sqa_") for n in s.client.list_collections())
    s.close()


@pytest.mark.parametrize("overlapping_writes", [1, READ_TRIES])  # the last: kept by merging
def test_a_reread_overlapped_by_an_own_write_never_undoes_it(store, overlapping_writes,
                                                               monkeypatch):
    """A replica's re-read of Milvus (refresh) that its own write overlaps may have been taken
    before the write committed; what it read must not replace the newer entry in memory (two
    replicas once both answered a round-2 version after their own round-4 writes)."""
    first = EntryData(id="lost", title="Lost card", answer="round 0")
    store.upsert("kb", [first], [vectors(first, 0)])
    state = store._kb("kb")
    scan, scans = store_module.scan_entries, []
    written = {"n": 0}

    def scan_then_write(client, st):
        got = scan(client, st)  # read as Milvus has it now...
        scans.append(got["lost"][1].answer)
        if written["n"] < overlapping_writes:  # ...then this process commits a newer one
            written["n"] += 1
            e = EntryData(id="lost", title="Lost card", answer=f"round {written['n']}")
            store.upsert("kb", [e], [vectors(e, 0)])
        return got

    monkeypatch.setattr(store_module, "scan_entries", scan_then_write)
    store._read_entries(state)
    assert store.get("kb", "lost").answer == f"round {overlapping_writes}"
    assert scans[0] == "round 0"  # the read that overlapped the write was the stale one
    # Once no write overlaps, the re-read is Milvus's as it is, and forgets the pins.
    monkeypatch.setattr(store_module, "scan_entries", scan)
    store._read_entries(state)
    assert store.get("kb", "lost").answer == f"round {overlapping_writes}"
    assert state.written_since(state.writes) == []


def test_a_reread_overlapped_by_an_own_delete_keeps_the_entry_gone(store, monkeypatch):
    a = EntryData(id="a", title="alpha", answer="first")
    store.upsert("kb", [a], [vectors(a, 0)])
    state = store._kb("kb")
    scan = store_module.scan_entries

    def scan_then_delete(client, st):
        got = scan(client, st)
        monkeypatch.setattr(store_module, "scan_entries", scan)
        store.delete("kb", ["a"])
        return got

    monkeypatch.setattr(store_module, "scan_entries", scan_then_delete)
    store._read_entries(state)
    with pytest.raises(NotFound):
        store.get("kb", "a")


def test_own_commits_are_confirmed_against_milvus_before_a_poll_skips_them(store):
    """On a shared Milvus another replica's commit of the same entry may land after this
    replica's and publish before it: the revision is then this replica's own, yet Milvus holds
    the other's entry. A poll first checks that Milvus still holds its own commits."""
    a = EntryData(id="a", title="alpha", answer="mine")
    store.upsert("kb", [a], [vectors(a, 0)])
    state = store._kb("kb")
    mine = state.committed["a"][0]
    state.unconfirmed = {key_of("a"): mine}
    assert store_module.own_writes_stand(store.client, state)
    assert state.unconfirmed == {}  # confirmed: forgotten
    theirs = EntryData(id="a", title="alpha", answer="theirs")
    store.upsert("kb", [theirs], [vectors(theirs, 0)])  # stands in for the other's commit
    state.unconfirmed = {key_of("a"): mine}
    assert not store_module.own_writes_stand(store.client, state)
    assert state.unconfirmed == {key_of("a"): mine}  # a re-read follows and settles it
    store._read_entries(state)
    assert state.unconfirmed == {} and store.get("kb", "a").answer == "theirs"
    state.unconfirmed = {key_of("gone"): -1}  # an own delete stands while the key is absent
    assert store_module.own_writes_stand(store.client, state)
