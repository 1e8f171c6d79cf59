"""Tests of the evaluation harness: readers, splits, metrics, the eval command on a fake client."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter

import pytest
from supportqa.v1 import supportqa_pb2
from supportqa_tools.evaluation import (
    EvalInputError,
    Example,
    Outcome,
    add_eval_arguments,
    apply_threshold,
    best_threshold,
    build_dataset,
    build_entries,
    compute_metrics,
    eval_main,
    format_sweep,
    read_csv_examples,
    read_examples,
    read_json_examples,
    readable_label,
    stratified_split,
    sweep_thresholds,
    threshold_grid,
)

# Metrics

# Five in-scope queries and two with the no-answer label "oos":
#   label  returned              rank of gold  latency
#   a      a, b, c               1             10
#   b      a, b, c               2             20
#   c      a, b, d, e, f, c      6             30
#   a      NoAnswer              miss          40
#   oos    NoAnswer              (true NA)     50
#   oos    b                     (missed NA)   60
#   d      call failed           miss          -
HAND_MADE = [
    Outcome("a", ("a", "b", "c"), latency_ms=10.0),
    Outcome("b", ("a", "b", "c"), latency_ms=20.0),
    Outcome("c", ("a", "b", "d", "e", "f", "c"), latency_ms=30.0),
    Outcome("a", no_answer=True, latency_ms=40.0),
    Outcome("oos", no_answer=True, latency_ms=50.0),
    Outcome("oos", ("b",), latency_ms=60.0),
    Outcome("d", error="UNAVAILABLE: server went away"),
]


def test_metrics_with_no_answer_label():
    m = compute_metrics(HAND_MADE, "oos")
    assert m["n_queries"] == 7
    assert m["n_in_scope"] == 5
    assert m["n_errors"] == 1
    # Gold first: only the first query, 1 of 5 in scope.
    assert m["accuracy_at_1"] == pytest.approx(1 / 5)
    assert m["in_scope_accuracy"] == pytest.approx(1 / 5)
    # Gold in the top 5: queries 1 and 2; rank 6 is past it.
    assert m["recall_at_5"] == pytest.approx(2 / 5)
    # (1 + 1/2 + 1/6 + 0 + 0) / 5 = (10/6) / 5 = 1/3.
    assert m["mrr"] == pytest.approx(1 / 3)
    # NoAnswer said twice (queries 4 and 5), right once: precision 1/2.
    assert m["no_answer_precision"] == pytest.approx(0.5)
    # Two oos queries, one got NoAnswer: recall 1/2; F1 = 2 * 0.5 * 0.5 / 1 = 0.5.
    assert m["no_answer_recall"] == pytest.approx(0.5)
    assert m["no_answer_f1"] == pytest.approx(0.5)
    # Six latencies 10..60 ms; nearest rank: p50 -> rank ceil(3) = 3, p95 -> ceil(5.7) = 6.
    assert m["latency_ms_p50"] == 30.0
    assert m["latency_ms_p95"] == 60.0


def test_metrics_without_no_answer_label_count_everything_in_scope():
    m = compute_metrics(HAND_MADE)
    # All 7 are in scope; "oos" is just a label no entry has. Still one hit.
    assert m["n_in_scope"] == 7
    assert m["accuracy_at_1"] == pytest.approx(1 / 7)
    assert m["recall_at_5"] == pytest.approx(2 / 7)
    assert "no_answer_f1" not in m
    assert "in_scope_accuracy" not in m


def test_metrics_undefined_denominators_are_none():
    m = compute_metrics([Outcome("oos", ("a",), latency_ms=5.0)], "oos")
    assert m["accuracy_at_1"] is None  # no in-scope query
    assert m["no_answer_precision"] is None  # NoAnswer never said
    assert m["no_answer_recall"] == 0.0
    assert m["no_answer_f1"] is None
    assert compute_metrics([])["latency_ms_p50"] is None


# Four queries asked with min_score=0:
#   label  best (score)      second
#   a      a (0.9)
#   b      a (0.5)           b (0.4)
#   oos    a (0.3)
#   oos    b (0.6)
SCORED = [
    Outcome("a", ("a",), (0.9,), latency_ms=1.0),
    Outcome("b", ("a", "b"), (0.5, 0.4), latency_ms=1.0),
    Outcome("oos", ("a",), (0.3,), latency_ms=1.0),
    Outcome("oos", ("b",), (0.6,), latency_ms=1.0),
]


def test_apply_threshold_turns_low_best_scores_into_no_answer():
    applied = apply_threshold(SCORED, 0.55)
    assert [o.no_answer for o in applied] == [False, True, True, False]
    assert applied[1].ranked == ()
    assert applied[0] == SCORED[0]


def test_sweep_thresholds_by_hand():
    rows = sweep_thresholds(SCORED, [0.35, 0.55, 0.7, 0.95], "oos")
    by_t = {r["threshold"]: r for r in rows}
    # 0.35: only the 0.3 query drops -> NA said once, right: P = 1, R = 1/2, F1 = 2/3.
    assert by_t[0.35]["no_answer_precision"] == pytest.approx(1.0)
    assert by_t[0.35]["no_answer_f1"] == pytest.approx(2 / 3)
    assert by_t[0.35]["in_scope_accuracy"] == pytest.approx(0.5)
    assert by_t[0.35]["answered"] == pytest.approx(0.75)
    # 0.55: 0.5 and 0.3 drop -> P = 1/2, R = 1/2, F1 = 1/2.
    assert by_t[0.55]["no_answer_f1"] == pytest.approx(0.5)
    # 0.7: all but 0.9 drop -> P = 2/3, R = 1, F1 = 2 * (2/3) / (5/3) = 0.8.
    assert by_t[0.7]["no_answer_f1"] == pytest.approx(0.8)
    assert by_t[0.7]["in_scope_accuracy"] == pytest.approx(0.5)
    # 0.95: everything drops -> P = 1/2, R = 1, F1 = 2/3, nothing answered.
    assert by_t[0.95]["no_answer_f1"] == pytest.approx(2 / 3)
    assert by_t[0.95]["in_scope_accuracy"] == 0.0
    assert best_threshold(rows) == 0.7
    assert "<" in format_sweep(rows, 0.7).splitlines()[3]


def test_threshold_grid_spans_scores_on_step_multiples():
    assert threshold_grid([0.3, 0.5, 0.6, 0.9], 0.1) == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert threshold_grid([0.42, 0.47], 0.05) == [0.4, 0.45, 0.5]
    assert threshold_grid([0.0, 1.0], 0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert threshold_grid([]) == []


# Readers


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("label_column", ["label", "category", "Intent"])
def test_csv_reader_accepts_label_column_names(tmp_path, label_column):
    path = write(
        tmp_path,
        "q.csv",
        f'text,{label_column}\nwhere is my card,card_arrival\n"hi, I lost it",lost_card\n\n',
    )
    assert read_csv_examples(path) == [
        Example("where is my card", "card_arrival"),
        Example("hi, I lost it", "lost_card"),
    ]


def test_csv_reader_ignores_extra_columns_and_bom(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes("\ufeffid,text,category\n1,top up failed,top_up_failed\n".encode())
    assert read_csv_examples(path) == [Example("top up failed", "top_up_failed")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        ("text,label\n", "no rows"),
        ("text,score\nhello,1\n", "no label column"),
        ("question,label\nhello,a\n", "no text column"),
        ("text,label\nhello,\n", ":2: empty label"),
        ("text,label\nhello,a\n,b\n", ":3: empty text"),
        ("text,label\nhello, there,a\n", "quote texts that contain commas"),
    ],
)
def test_csv_reader_rejects_malformed_files(tmp_path, content, message):
    path = write(tmp_path, "bad.csv", content)
    with pytest.raises(EvalInputError, match=re.escape(message)):
        read_csv_examples(path)


CLINC = {
    "train": [["what is my balance", "balance"], ["translate hello", "translate"]],
    "val": [["how much money do I have", "balance"]],
    "oos_val": [["a show on broadway", "oos"]],
}


def test_json_reader_concatenates_chosen_splits(tmp_path):
    path = write(tmp_path, "c.json", json.dumps(CLINC))
    assert read_json_examples(path, ["val", "oos_val"]) == [
        Example("how much money do I have", "balance"),
        Example("a show on broadway", "oos"),
    ]
    single = write(tmp_path, "one.json", json.dumps({"train": CLINC["train"]}))
    assert len(read_json_examples(single)) == 2


@pytest.mark.parametrize(
    ("content", "splits", "message"),
    [
        ('{"train": [["a", "b"]', ["train"], "malformed JSON at line 1"),
        ("[]", ["train"], "expected an object of splits"),
        (json.dumps(CLINC), ["test"], "unknown split 'test'; available: train, val, oos_val"),
        (json.dumps(CLINC), [], "holds several splits (train, val, oos_val); choose with"),
        ('{"train": [["only text"]]}', ["train"], "item 0: expected [text, intent]"),
        ('{"train": {"a": "b"}}', ["train"], "is not a list"),
        ('{"train": []}', ["train"], "hold no examples"),
    ],
)
def test_json_reader_rejects_malformed_files(tmp_path, content, splits, message):
    path = write(tmp_path, "bad.json", content)
    with pytest.raises(EvalInputError, match=re.escape(message)):
        read_json_examples(path, splits)


def test_read_examples_dispatch(tmp_path):
    sniffed = write(tmp_path, "data.txt", json.dumps(CLINC))
    assert len(read_examples(sniffed, ["train"])) == 2
    csv_path = write(tmp_path, "q.csv", "text,label\nhello,a\n")
    with pytest.raises(EvalInputError, match="JSON files only"):
        read_examples(csv_path, ["train"], split_flag="--kb-split")
    with pytest.raises(EvalInputError, match="no such file"):
        read_examples(tmp_path / "missing.csv")


# Splits and entries


def labelled(sizes: dict[str, int]) -> list[Example]:
    return [Example(f"{label} {i}", label) for label, n in sizes.items() for i in range(n)]


SIZES = {"single": 1, "pair": 2, "five": 5, "ten": 10, "many": 37}


def test_stratified_split_fractions_per_label():
    kept, held = stratified_split(labelled(SIZES), 0.2, seed=13)
    held_counts = Counter(e.label for e in held)
    # round(0.2 n) half up, clamped to [1, n - 1]; a single example stays in the KB.
    assert dict(held_counts) == {"pair": 1, "five": 1, "ten": 2, "many": 7}
    assert Counter(e.label for e in kept)["single"] == 1


def test_stratified_split_no_leakage_and_covers_input():
    examples = labelled(SIZES)
    kept, held = stratified_split(examples, 0.3, seed=1)
    assert not set(kept) & set(held)
    assert sorted(kept + held, key=examples.index) == examples
    assert kept == [e for e in examples if e in set(kept)]  # input order kept


def test_stratified_split_deterministic_per_seed():
    examples = labelled(SIZES)
    assert stratified_split(examples, 0.2, 13) == stratified_split(examples, 0.2, 13)
    assert stratified_split(examples, 0.2, 13) != stratified_split(examples, 0.2, 14)
    # A label's split does not depend on the other labels.
    alone = stratified_split(labelled({"many": 37}), 0.2, 13)[1]
    assert alone == [e for e in stratified_split(examples, 0.2, 13)[1] if e.label == "many"]


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(labelled(SIZES), 1.0, 0)


def test_build_dataset_same_source_keeps_no_answer_rows_out_of_kb():
    examples = labelled({"a": 10, "b": 10, "oos": 10})
    data = build_dataset(examples, examples, same_source=True, no_answer_label="oos", seed=3)
    assert {e.label for e in data.kb} == {"a", "b"}
    assert Counter(e.label for e in data.queries) == {"a": 2, "b": 2, "oos": 2}
    assert not set(data.kb) & set(data.queries)
    assert data.warnings == []


def test_build_dataset_separate_sources_warns_and_limits():
    kb = labelled({"a": 3, "b": 3})
    queries = [Example("a 0", "a"), Example("new", "c"), Example("x", "oos"), Example("y", "b")]
    data = build_dataset(kb, queries, same_source=False, no_answer_label="oos", seed=0, limit=3)
    assert len(data.queries) == 3
    full = build_dataset(kb, queries, same_source=False, no_answer_label="oos", seed=0)
    assert len(full.kb) == 6
    assert any(
        "1 queries have 1 labels with no knowledge-base entry (c)" in w for w in full.warnings
    )
    assert any("1 queries appear verbatim" in w for w in full.warnings)


def test_entries_one_per_label():
    kb = [Example("hi", "card_arrival"), Example("hi", "card_arrival"), Example("yo", "b-c")]
    entries = build_entries(kb, "eval")
    assert [e.id for e in entries] == ["b-c", "card_arrival"]
    assert entries[1].title == "Card arrival"
    assert list(entries[1].questions) == ["hi"]
    assert entries[1].answer == "Answer for card_arrival"
    assert entries[1].knowledge_base == "eval"
    assert readable_label("ATM_support") == "ATM support"


# The eval command, against an in-memory client


class FakeClient:
    """Ranks entries by word overlap (Jaccard) with their paraphrases; threshold 0.3."""

    def __init__(self, target: str = "fake:1"):
        self.target = target
        self.entries: dict[str, supportqa_pb2.Entry] = {}
        self.stats_calls = 0
        self.asked_while_training = 0

    async def stats(self, knowledge_base=""):
        # The entry head is "training" on the first look after a write, as on a real server.
        self.stats_calls += 1
        head = "training" if self.stats_calls == 1 else "ready"
        return supportqa_pb2.StatsReply(knowledge_bases=[
            supportqa_pb2.KnowledgeBaseStats(name=knowledge_base, head=head)
        ])

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def upsert(self, entries):
        summary = supportqa_pb2.UpsertSummary()
        for entry in entries:
            self.entries[entry.id] = entry
            summary.received += 1
            summary.written += 1
            summary.rows += len(entry.questions)
        return summary

    async def ask(self, text="", *, knowledge_base="default", top_k=5, min_score=None, **_):
        self.asked_while_training += self.stats_calls < 2
        words = set(text.lower().split())

        def score(entry):
            return max(
                len(words & set(q.lower().split())) / len(words | set(q.lower().split()))
                for q in entry.questions
            )

        ranked = sorted(self.entries.values(), key=score, reverse=True)[:top_k]
        threshold = 0.3 if min_score is None else min_score
        reply = supportqa_pb2.AnswerSet()
        if not ranked or score(ranked[0]) < threshold:
            reply.no_answer.best_score = score(ranked[0]) if ranked else 0.0
            reply.no_answer.threshold = threshold
            return reply
        for rank, entry in enumerate(ranked, 1):
            reply.answers.add(rank=rank, entry_id=entry.id, score=score(entry))
        return reply


def parse(argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def banking_csv(tmp_path):
    rows = ["text,category"]
    for label, words in {
        "card_arrival": "card arrive arrived delivery post",
        "top_up_failed": "top up failed declined money",
        "exchange_rate": "exchange rate euro dollar conversion",
    }.items():
        vocab = words.split()
        rows += [f"my {vocab[i % 5]} {vocab[(i + 1) % 5]} question {i},{label}" for i in range(10)]
    rows += [f"weather tomorrow in city {i},oos" for i in range(10)]
    return write(tmp_path, "bank.csv", "\n".join(rows) + "\n")


def test_eval_main_runs_on_dev_split(tmp_path, banking_csv, capsys):
    client = FakeClient()
    out = tmp_path / "m.json"
    args = parse(
        ["--kb", str(banking_csv), "--target", "fake:1", "--no-answer-label", "oos"]
        + ["--json-out", str(out), "--concurrency", "3"]
    )
    assert eval_main(args, client_factory=lambda target: client) == 0
    metrics = json.loads(out.read_text())
    assert set(client.entries) == {"card_arrival", "top_up_failed", "exchange_rate"}
    # It waited for the entry head to leave "training" before the first question.
    assert client.stats_calls == 2 and client.asked_while_training == 0
    # 20% of 10 per label: 2 each from 4 labels.
    assert metrics["n_queries"] == 8
    for key in (
        "accuracy_at_1",
        "recall_at_5",
        "mrr",
        "in_scope_accuracy",
        "no_answer_precision",
        "no_answer_recall",
        "no_answer_f1",
        "latency_ms_p50",
        "latency_ms_p95",
    ):
        assert key in metrics
    assert metrics["recall_at_5"] == 1.0
    assert metrics["no_answer_recall"] == 1.0  # weather shares no word with banking
    assert metrics["modality"] == "text"
    assert "accuracy_at_1" in capsys.readouterr().out


def test_eval_main_sweep_applies_best_threshold(tmp_path, banking_csv, capsys):
    out = tmp_path / "m.json"
    args = parse(
        ["--kb", str(banking_csv), "--queries", str(banking_csv), "--target", "fake:1"]
        + ["--no-answer-label", "oos", "--sweep-thresholds", "--json-out", str(out)]
    )
    assert eval_main(args, client_factory=FakeClient) == 0
    metrics = json.loads(out.read_text())
    assert metrics["sweep"]
    assert metrics["config"]["threshold_applied"] == metrics["best_threshold"]
    f1s = [r["no_answer_f1"] for r in metrics["sweep"] if r["no_answer_f1"] is not None]
    assert metrics["no_answer_f1"] == max(f1s)
    assert "threshold sweep" in capsys.readouterr().out


def test_eval_main_counts_failed_calls(tmp_path, banking_csv, capsys):
    class Failing(FakeClient):
        async def ask(self, *args, **kwargs):
            raise RuntimeError("boom")

    args = parse(["--kb", str(banking_csv), "--target", "fake:1"])
    assert eval_main(args, client_factory=Failing) == 1
    assert "every query failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("files", "flags", "message"),
    [
        ({}, ["--kb", "{tmp}/missing.csv"], "no such file"),
        ({"bad.csv": "text,score\nhi,1\n"}, ["--kb", "{tmp}/bad.csv"], "no label column"),
        ({"empty.csv": ""}, ["--kb", "{tmp}/empty.csv"], "empty file"),
        ({"bad.json": "{oops"}, ["--kb", "{tmp}/bad.json", "--kb-split", "x"], "malformed JSON"),
        (
            {"c.json": json.dumps(CLINC)},
            ["--kb", "{tmp}/c.json", "--kb-split", "train", "--queries-split", "tst"],
            "unknown split 'tst'; available: train, val, oos_val",
        ),
        (
            {"c.json": json.dumps(CLINC)},
            ["--kb", "{tmp}/c.json"],
            "choose with --kb-split",
        ),
        ({"q.csv": "text,label\na,b\n"}, ["--kb", "{tmp}/q.csv", "--top-k", "0"], "--top-k"),
    ],
)
def test_eval_main_bad_input_exits_2(tmp_path, capsys, files, flags, message):
    for name, content in files.items():
        write(tmp_path, name, content)
    args = parse([f.format(tmp=tmp_path) for f in flags] + ["--target", "fake:1"])
    assert eval_main(args, client_factory=FakeClient) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("supportqa-server eval: error:")
