"""Milvus Lite search/insert cost at growing row counts, through our real KnowledgeStore.

Runs in whichever venv starts it (the Milvus Lite and pymilvus versions are printed), so the
same script measures two releases side by side:

    .venv/bin/python benchmarks/bench_milvus.py --rows 1000 10000 100000
    .venv-milvus3/bin/python benchmarks/bench_milvus.py --rows 1000 10000 100000

Each (rows, vectors) case runs in a fresh child process on a fresh temp database, so memory,
background threads and the 2.5 server process do not leak from one case into the next. Rows are
what our store writes: per entry a title, three paraphrases (banking77 questions of the entry's
category) and an answer, 5 rows per entry, with a 384-d unit vector each. `clustered` vectors sit
around 77 category centres (cosine to the centre ~0.6, to their entry's centre ~0.85), like
sentence embeddings; `random` ones are uniform on the sphere. Queries are new paraphrase-like
vectors of a random entry, with a banking77 question of the same category as the BM25 text.

Measured per case: ingest through KnowledgeStore.upsert (200 entries = 1000 rows per call, the
store's insert batch), search latency right after ingest, flush time, the seconds (and CPU
seconds) until search latency is stable, then, round-robin so machine noise hits all alike:
dense top-200 (KnowledgeStore.search, lexical off), BM25 top-200 (the store's sparse call),
hybrid (KnowledgeStore.search: dense + BM25, as the product runs it), hybrid with a tag filter,
and nq=32 batches (per-query time). Then recall of the dense route against numpy brute force,
a grouping search (group_by_field="entry_id"), and the RSS of the process tree (the 2.5 server
is a child process; 3.x serves in-process).

Prints one markdown table per Milvus Lite version; `--json FILE` also saves the raw numbers and
`--compare A.json B.json` prints ratio tables from two saved runs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))

BANKING = ROOT.parent / "shared" / "data" / "text" / "banking77" / "train.csv"
DIM = 384
ROWS_PER_ENTRY = 5  # title, 3 paraphrases, answer
ENTRIES_PER_CALL = 200  # 1000 rows: one insert batch of the store
LIMIT = 200  # rows per route, as the pipeline asks (MIN_ROWS)
KB = "bench"
FIELDS = ["entry_id", "version", "kind", "text"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# Process-tree accounting from /proc (no psutil): the 2.5 server is a child process.


def _tree_pids() -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [os.getpid()]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_s() -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in _tree_pids():
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def tree_mem_mb() -> tuple[float, float]:
    """(sum of VmRSS, sum of VmHWM) over the process tree, in MB."""
    rss = hwm = 0.0
    for p in _tree_pids():
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) / 1024
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1]) / 1024
        except OSError:
            pass
    return rss, hwm


def loadavg() -> float:
    return os.getloadavg()[0]


# Data


def banking() -> dict[str, list[str]]:
    by_cat: dict[str, list[str]] = {}
    with open(BANKING, newline="") as f:
        for r in csv.DictReader(f):
            by_cat.setdefault(r["category"], []).append(r["text"])
    return by_cat


def make_data(n_rows: int, kind: str, seed: int = 0):
    import numpy as np
    from supportqa_server.knowledge.store import EntryData

    rng = np.random.default_rng(seed)
    texts = banking()
    cats = sorted(texts)
    n_entries = max(1, n_rows // ROWS_PER_ENTRY)
    cat_of = rng.integers(0, len(cats), n_entries)
    entries, vecs = [], []
    centres = rng.standard_normal((len(cats), DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # per-dimension noise s gives cos ~ 1/sqrt(1 + DIM s^2) to the clean vector
    entry_noise, row_noise = 0.055, 0.03
    entry_centres = centres[cat_of] + entry_noise * rng.standard_normal((n_entries, DIM))
    entry_centres /= np.linalg.norm(entry_centres, axis=1, keepdims=True)
    entry_centres = entry_centres.astype(np.float32)
    for i in range(n_entries):
        cat = cats[cat_of[i]]
        pool = texts[cat]
        qs = tuple(pool[j] for j in rng.choice(len(pool), 3, replace=False))
        words = cat.replace("_", " ")
        e = EntryData(
            id=f"e{i:06d}", title=f"{words.capitalize()} (article {i})",
            answer=f"About {words}: {pool[int(rng.integers(len(pool)))]} Open the app, go to "
                   f"Help > {words.title()} and follow the steps; reference {i}.",
            questions=qs, tags=(cat, "retail" if i % 3 else "business"), locale="en-GB",
        )
        k = len(e.texts())
        if kind == "clustered":
            v = entry_centres[i] + row_noise * rng.standard_normal((k, DIM)).astype(np.float32)
        else:
            v = rng.standard_normal((k, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        entries.append(e)
        vecs.append(v)

    def queries(nq: int, qseed: int):
        """(vectors, texts, categories) of nq questions about random entries."""
        r = np.random.default_rng(qseed)
        idx = r.integers(0, n_entries, nq)
        if kind == "clustered":
            q = entry_centres[idx] + row_noise * r.standard_normal((nq, DIM)).astype(np.float32)
        else:
            q = r.standard_normal((nq, DIM)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        qc = [cats[cat_of[i]] for i in idx]
        qt = [texts[c][int(r.integers(len(texts[c])))] for c in qc]
        return q.astype(np.float32), qt, qc

    return entries, vecs, queries


def _patch_index(store, index: str) -> None:
    """Makes the store build `index` instead of FLAT on its dense field (other configs)."""
    if index == "FLAT":
        return
    c = store.client
    orig = c.prepare_index_params
    params = {"IVF_FLAT": {"nlist": 256}, "HNSW": {"M": 16, "efConstruction": 200}}.get(index, {})

    def prepare(*a, **k):
        ip = orig(*a, **k)
        add = ip.add_index

        def add_index(field_name, index_type="", **kw):
            if field_name == "vector" and index_type == "FLAT":
                index_type = index
                kw["params"] = params
            return add(field_name, index_type=index_type, **kw)

        ip.add_index = add_index
        return ip

    c.prepare_index_params = prepare


def _shim_pymilvus3(c) -> bool:
    """Lets the store run on pymilvus 3: returns True when the shim is on.

    pymilvus 3.0.2 keys a hit by the primary field's name ("pk") where 2.5 says "id" (the
    store reads h["id"]: KeyError), and output_fields=[] returns every field, vectors
    included, where 2.5 returns none. The shim asks for ["pk"] instead of [] and adds "id";
    the store's fix would be `h.id` (both versions) and output_fields=["pk"].
    """
    import pymilvus

    if int(pymilvus.__version__.split(".")[0]) < 3:
        return False
    search = c.search

    def shimmed(*a, **k):
        if not k.get("output_fields"):
            k["output_fields"] = ["pk"]
        found = search(*a, **k)
        for hits in found:
            for h in hits:
                h["id"] = h.id
        return found

    c.search = shimmed
    return True


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def run_case(n_rows: int, kind: str, index: str, budget_s: float) -> dict:
    import milvus_lite
    import numpy as np
    import pymilvus
    from supportqa_server.knowledge.layout import rows_name
    from supportqa_server.knowledge.store import KnowledgeStore

    res: dict = {
        "milvus_lite": milvus_lite.__version__, "pymilvus": pymilvus.__version__,
        "rows": n_rows, "vectors": kind, "index": index, "load_start": loadavg(),
    }
    log(f"milvus-lite {res['milvus_lite']} pymilvus {res['pymilvus']}: {n_rows} rows, "
        f"{kind} vectors, {index}")
    entries, vecs, queries = make_data(n_rows, kind)
    all_vecs = np.concatenate(vecs)
    res["rows"] = len(all_vecs)
    tmp = tempfile.mkdtemp(prefix="bench_milvus_")
    t0 = time.perf_counter()
    store = KnowledgeStore(str(Path(tmp) / "milvus.db"), DIM)
    store.open()
    res["open_s"] = time.perf_counter() - t0
    _patch_index(store, index)
    c = store.client
    raw_search = c.search
    res["shim"] = _shim_pymilvus3(c)
    res["store_sha1"] = hashlib.sha1((ROOT / "server/supportqa_server/store.py").read_bytes()
                                     ).hexdigest()[:10]
    coll = rows_name(KB)

    t0 = time.perf_counter()
    store._kb(KB, create=True)  # the collection pair, timed apart from the rows
    res["create_s"] = time.perf_counter() - t0
    spent: dict[str, float] = {}

    def timed(name, fn):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return call

    saved = {m: getattr(c, m) for m in ("insert", "upsert", "delete")}
    for m, fn in saved.items():
        setattr(c, m, timed(m, fn))
    cpu0, t0 = tree_cpu_s(), time.perf_counter()
    for i in range(0, len(entries), ENTRIES_PER_CALL):
        store.upsert(KB, entries[i : i + ENTRIES_PER_CALL], vecs[i : i + ENTRIES_PER_CALL])
    res["ingest_s"] = time.perf_counter() - t0
    res["ingest_rows_per_s"] = len(all_vecs) / res["ingest_s"]
    res["ingest_cpu_s"] = tree_cpu_s() - cpu0
    for m, fn in saved.items():
        setattr(c, m, fn)
        res[f"ingest_{m}_s"] = spent.get(m, 0.0)
    log(f"ingest {res['ingest_s']:.1f} s ({res['ingest_rows_per_s']:.0f} rows/s; rows insert "
        f"{res['ingest_insert_s']:.1f} s, entries upsert {res['ingest_upsert_s']:.1f} s, "
        f"old-version delete {res['ingest_delete_s']:.1f} s)")

    qv, qt, qc = queries(400, 1)
    qi = [0]

    def next_q(nq: int = 1):
        i = qi[0] % (len(qv) - nq)
        qi[0] += nq
        return qv[i : i + nq], qt[i : i + nq], qc[i : i + nq]

    def hybrid1() -> None:
        v, t, _ = next_q()
        store.search(KB, v, t, limit=LIMIT)

    # Right after ingest, before any flush: what a reader sees while a load is being written.
    before = []
    t_end = time.perf_counter() + 20
    while len(before) < 5 and (len(before) < 2 or time.perf_counter() < t_end):
        t = time.perf_counter()
        hybrid1()
        before.append(time.perf_counter() - t)
    res["hybrid_before_flush_ms"] = statistics.median(before) * 1000
    log(f"hybrid before flush: {[round(x * 1000) for x in before]} ms")
    t0 = time.perf_counter()
    c.flush(coll)
    res["flush_s"] = time.perf_counter() - t0

    # Settle: probe once a second until the process tree is idle and latency is flat.
    cpu0, t0 = tree_cpu_s(), time.perf_counter()
    lat, cpu_rate = [], []
    settle_max = min(240.0, budget_s * 0.4)
    while True:
        cs, ts = tree_cpu_s(), time.perf_counter()
        t = time.perf_counter()
        hybrid1()
        lat.append(time.perf_counter() - t)
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - ts)))
        cpu_rate.append((tree_cpu_s() - cs) / (time.perf_counter() - ts) - lat[-1] / (
            time.perf_counter() - ts))  # CPU beyond the probe itself, in cores (approx.)
        if len(lat) >= 4:
            last = lat[-3:]
            idle = max(cpu_rate[-3:]) < 0.35
            flat = max(last) < 1.3 * min(last) + 0.005
            if idle and flat:
                break
        if time.perf_counter() - t0 > settle_max:
            res["settle_timed_out"] = True
            break
    res["settle_s"] = time.perf_counter() - t0
    res["settle_cpu_s"] = tree_cpu_s() - cpu0 - sum(lat)
    res["settle_probe_ms"] = [round(x * 1000, 1) for x in lat]
    try:  # what Milvus says it built on the dense field
        names = c.list_indexes(coll, field_name="vector")
        d = c.describe_index(coll, names[0]) if names else {}
        res["vector_index"] = {k: d.get(k) for k in ("index_type", "metric_type", "params",
                                                     "nlist", "indexed_rows", "state") if k in d}
    except Exception as e:  # noqa: BLE001
        res["vector_index"] = f"{type(e).__name__}: {e}"
    rss, hwm = tree_mem_mb()
    res["rss_mb_after_settle"], res["hwm_mb_after_settle"] = rss, hwm
    log(f"flush {res['flush_s']:.2f} s, settled in {res['settle_s']:.0f} s "
        f"({res['settle_cpu_s']:.0f} CPU s), RSS {rss:.0f} MB")

    # Round-robin timings.
    def dense1() -> None:
        v, t, _ = next_q()
        store.search(KB, v, t, limit=LIMIT, lexical=False)

    def bm25_1() -> None:
        _, t, _ = next_q()
        c.search(coll, data=t, anns_field="sparse", limit=LIMIT, filter="",
                 output_fields=FIELDS, search_params={"metric_type": "BM25"})

    def raw_dense1() -> None:  # the store's dense call as sent, no shim: [] means "all" on 3.x
        v, _, _ = next_q()
        raw_search(coll, data=[x.tolist() for x in v], anns_field="vector", limit=LIMIT,
                   filter="", output_fields=[], search_params={"metric_type": "IP"})

    def filtered1() -> None:
        v, t, cat = next_q()
        store.search(KB, v, t, limit=LIMIT, tags=(cat[0],))

    def dense32() -> None:
        v, t, _ = next_q(32)
        store.search(KB, v, t, limit=LIMIT, lexical=False)

    def hybrid32() -> None:
        v, t, _ = next_q(32)
        store.search(KB, v, t, limit=LIMIT)

    metrics = {  # name: (fn, queries per call, most samples)
        "dense": (dense1, 1, 100), "bm25": (bm25_1, 1, 100), "hybrid": (hybrid1, 1, 100),
        "hybrid_tag_filter": (filtered1, 1, 60), "raw_dense_no_fields": (raw_dense1, 1, 40),
        "dense_nq32": (dense32, 32, 12), "hybrid_nq32": (hybrid32, 32, 12),
    }
    for fn, _, _ in metrics.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in metrics}
    t0 = time.perf_counter()
    measure_s = budget_s * 0.4
    rounds = 0
    while True:
        rounds += 1
        for name, (fn, nq, most) in metrics.items():
            if len(samples[name]) >= most:
                continue
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) / nq)
        done = all(len(samples[k]) >= m for k, (_, _, m) in metrics.items())
        if done or (rounds >= 3 and time.perf_counter() - t0 > measure_s):
            break
    res["measure_s"] = time.perf_counter() - t0
    for name, xs in samples.items():
        res[f"{name}_ms_p50"] = statistics.median(xs) * 1000
        res[f"{name}_ms_p99"] = pct(xs, 99) * 1000
        res[f"{name}_n"] = len(xs)
    log("p50 ms: " + ", ".join(f"{k} {res[k + '_ms_p50']:.1f}" for k in metrics))

    # Recall of the dense route (row ids) against exact inner product.
    rv, _, _ = queries(20, 2)
    exact = np.argsort(-(rv @ all_vecs.T), axis=1)
    found = raw_search(coll, data=[v.tolist() for v in rv], anns_field="vector", limit=LIMIT,
                     output_fields=["pk"], search_params={"metric_type": "IP"})
    # pk is "entry\x1fversion\x1fi"; map exact row index -> (entry, i) to compare
    row_key = [f"{e.id}\x1f{i}" for e in entries for i in range(len(e.texts()))]
    for k in (10, LIMIT):
        rec = []
        for qn, hits in enumerate(found):
            got = {h.id.split("\x1f")[0] + "\x1f" + h.id.split("\x1f")[2] for h in hits[:k]}
            want = {row_key[j] for j in exact[qn, :k]}
            rec.append(len(got & want) / k)
        res[f"recall_at_{k}"] = statistics.mean(rec)

    # Grouping search: top entries straight from Milvus instead of 200 rows.
    res.update(grouping(raw_search, coll, queries))

    rss, hwm = tree_mem_mb()
    res["rss_mb_end"], res["hwm_mb_end"] = rss, hwm
    res["load_end"] = loadavg()
    store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def grouping(search, coll: str, queries) -> dict:
    out: dict = {}
    v, t, _cats = queries(12, 3)
    calls = {
        "group_dense": {"data": [x.tolist() for x in v], "anns_field": "vector",
                            "search_params": {"metric_type": "IP"}},
        "group_bm25": {"data": list(t), "anns_field": "sparse",
                           "search_params": {"metric_type": "BM25"}},
    }
    for name, kw in calls.items():
        try:
            lat = []
            for i in range(len(kw["data"])):
                one = dict(kw, data=kw["data"][i : i + 1])
                t0 = time.perf_counter()
                g = search(coll, limit=40, output_fields=FIELDS, group_by_field="entry_id",
                             group_size=5, strict_group_size=False, **one)
                lat.append(time.perf_counter() - t0)
                if i == 0:
                    hits = g[0]
                    ents = [h["entity"]["entry_id"] for h in hits]
                    per = {}
                    for e in ents:
                        per[e] = per.get(e, 0) + 1
                    flat = search(coll, limit=LIMIT, output_fields=FIELDS, **one)[0]
                    seen: list[str] = []
                    for h in flat:
                        if h["entity"]["entry_id"] not in seen:
                            seen.append(h["entity"]["entry_id"])
                    first: list[str] = []
                    for e in ents:
                        if e not in first:
                            first.append(e)
                    out[f"{name}_hits"] = len(hits)
                    out[f"{name}_entries"] = len(per)
                    out[f"{name}_max_rows_per_entry"] = max(per.values()) if per else 0
                    out[f"{name}_flat200_entries"] = len(seen)
                    out[f"{name}_top10_same_as_flat"] = first[:10] == seen[:10]
            out[f"{name}_ms_p50"] = statistics.median(lat) * 1000
            out[f"{name}_works"] = True
        except Exception as e:  # noqa: BLE001 - report, don't fail the run
            out[f"{name}_works"] = False
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


# Reporting

ROWS_SHOWN = [
    ("Rows", "rows", "{:,}"),
    ("Ingest rows/s (KnowledgeStore.upsert)", "ingest_rows_per_s", "{:,.0f}"),
    ("of which insert / entries upsert / delete (s)",
     ("ingest_insert_s", "ingest_upsert_s", "ingest_delete_s"), "{:.1f} / {:.1f} / {:.1f}"),
    ("Hybrid right after ingest, before flush (ms)", "hybrid_before_flush_ms", "{:,.0f}"),
    ("flush() (s)", "flush_s", "{:.2f}"),
    ("Settle after flush (s) / CPU s", ("settle_s", "settle_cpu_s"), "{:.0f} / {:.0f}"),
    ("Dense top-200 p50 / p99 (ms)", ("dense_ms_p50", "dense_ms_p99"), "{:.1f} / {:.1f}"),
    ("BM25 top-200 p50 / p99 (ms)", ("bm25_ms_p50", "bm25_ms_p99"), "{:.1f} / {:.1f}"),
    ("Hybrid (dense+BM25) p50 / p99 (ms)", ("hybrid_ms_p50", "hybrid_ms_p99"), "{:.1f} / {:.1f}"),
    ("Hybrid + tag filter p50 / p99 (ms)",
     ("hybrid_tag_filter_ms_p50", "hybrid_tag_filter_ms_p99"), "{:.1f} / {:.1f}"),
    ("Raw dense call, output_fields=[] unshimmed (ms)", "raw_dense_no_fields_ms_p50", "{:.1f}"),
    ("Dense nq=32, per query p50 (ms)", "dense_nq32_ms_p50", "{:.1f}"),
    ("Hybrid nq=32, per query p50 (ms)", "hybrid_nq32_ms_p50", "{:.1f}"),
    ("Samples (single / nq=32)", ("hybrid_n", "hybrid_nq32_n"), "{} / {}"),
    ("Dense recall@10 / @200 vs exact", ("recall_at_10", "recall_at_200"), "{:.3f} / {:.3f}"),
    ("Group-by dense (40 entries x 5) p50 (ms)", "group_dense_ms_p50", "{:.1f}"),
    ("Group-by BM25 (40 entries x 5) p50 (ms)", "group_bm25_ms_p50", "{:.1f}"),
    ("RSS after settle / end (MB, process tree)", ("rss_mb_after_settle", "rss_mb_end"),
     "{:.0f} / {:.0f}"),
    ("Peak RSS (MB, sum of VmHWM)", "hwm_mb_end", "{:.0f}"),
    ("Load average start / end", ("load_start", "load_end"), "{:.1f} / {:.1f}"),
]


def _cell(r: dict, key, fmt: str) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    if any(k not in r for k in keys):
        return "n/a"
    return fmt.format(*(r[k] for k in keys))


def table(results: list[dict]) -> str:
    head = "| | " + " | ".join(f"{r['rows']:,} rows, {r['vectors']}, {r['index']}"
                                 for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for label, key, fmt in ROWS_SHOWN[1:]:
        lines.append(f"| {label} | " + " | ".join(_cell(r, key, fmt) for r in results) + " |")
    notes = []
    for r in results:
        for g in ("group_dense", "group_bm25"):
            if not r.get(f"{g}_works", True):
                notes.append(f"- {r['rows']:,} rows: {g} failed: {r[f'{g}_error']}")
            elif f"{g}_hits" in r:
                notes.append(
                    f"- {r['rows']:,} rows: {g}: {r[f'{g}_hits']} rows from "
                    f"{r[f'{g}_entries']} entries (<= {r[f'{g}_max_rows_per_entry']} per entry); "
                    f"a flat top-200 covers {r[f'{g}_flat200_entries']} entries; same top-10 "
                    f"entries: {r[f'{g}_top10_same_as_flat']}"
                )
        if r.get("settle_timed_out"):
            notes.append(f"- {r['rows']:,} rows: settle wait hit its limit")
    return "\n".join(lines + ([""] + notes if notes else []))


COMPARED = [
    ("Ingest rows/s", "ingest_rows_per_s", True),
    ("Hybrid before flush", "hybrid_before_flush_ms", False),
    ("Settle after flush (s)", "settle_s", False),
    ("Dense p50", "dense_ms_p50", False),
    ("BM25 p50", "bm25_ms_p50", False),
    ("Hybrid p50", "hybrid_ms_p50", False),
    ("Hybrid p99", "hybrid_ms_p99", False),
    ("Hybrid + tag filter p50", "hybrid_tag_filter_ms_p50", False),
    ("Dense nq=32 per query", "dense_nq32_ms_p50", False),
    ("Hybrid nq=32 per query", "hybrid_nq32_ms_p50", False),
    ("Peak RSS (MB)", "hwm_mb_end", False),
]


def compare(a: list[dict], b: list[dict]) -> str:
    va, vb = a[0]["milvus_lite"], b[0]["milvus_lite"]
    keyed = {(r["rows"], r["vectors"], r["index"]): r for r in b}
    pairs = [(r, keyed[(r["rows"], r["vectors"], r["index"])]) for r in a
             if (r["rows"], r["vectors"], r["index"]) in keyed]
    head = "| | " + " | ".join(f"{x['rows']:,} rows: {va} / {vb} (ratio)" for x, _ in pairs) + " |"
    lines = [head, "|---" * (len(pairs) + 1) + "|"]
    for label, key, _ in COMPARED:
        cells = []
        for x, y in pairs:
            if key in x and key in y and y[key]:
                cells.append(f"{x[key]:,.1f} / {y[key]:,.1f} ({x[key] / y[key]:.2f}x)")
            else:
                cells.append("n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--vectors", nargs="+", default=["clustered"],
                    choices=["clustered", "random"])
    ap.add_argument("--index", default="FLAT", choices=["FLAT", "IVF_FLAT", "AUTOINDEX", "HNSW"],
                    help="dense index (FLAT is what KnowledgeStore builds)")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="rough seconds per case for settle + timings (ingest not included)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--compare", nargs=2, metavar="JSON", help="print ratios of two saved runs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        print(compare(a, b))
        return
    if args.child:
        r = run_case(args.rows[0], args.vectors[0], args.index, args.budget_s)
        print("RESULT " + json.dumps(r), flush=True)
        return

    import milvus_lite
    import pymilvus

    print(f"python {sys.executable}: milvus-lite {milvus_lite.__version__}, "
          f"pymilvus {pymilvus.__version__}, {os.cpu_count()} CPUs")
    results = []
    for kind in args.vectors:
        for n in args.rows:
            cmd = [sys.executable, __file__, "--child", "--rows", str(n), "--vectors", kind,
                   "--index", args.index, "--budget-s", str(args.budget_s)]
            p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                log(f"case {n} {kind} failed (exit {p.returncode}): {p.stdout[-2000:]}")
                continue
            results.append(json.loads(line[-1][len("RESULT "):]))
            if args.json:  # save as we go
                Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nmilvus-lite {milvus_lite.__version__} + pymilvus {pymilvus.__version__}\n")
    print(table(results))


if __name__ == "__main__":
    main()
