"""The learning loop of the eval harness (`supportqa-server eval --loop`): its split and its
bot's Feedback, and a small real loop through an in-process server."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
from supportqa_tools.evaluation import Example, Outcome, add_eval_arguments, eval_main
from supportqa_tools.loop import feedback_for, split_for_loop


def parse(argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def test_split_keeps_k_per_label_and_is_deterministic_per_seed():
    kb = [Example(f"{label} {i}", label) for label in ("a", "b", "c") for i in range(9)]
    kept, traffic = split_for_loop(kb, 3, seed=13)
    assert {e.label: sum(k.label == e.label for k in kept) for e in kept} == {
        "a": 3, "b": 3, "c": 3}
    assert sorted(kept + traffic, key=kb.index) == kb and not set(kept) & set(traffic)
    assert split_for_loop(kb, 3, seed=13) == (kept, traffic)
    assert split_for_loop(kb, 3, seed=14) != (kept, traffic)
    extra = [Example("weather", "oos")]
    capped = split_for_loop(kb, 3, seed=13, extra=extra, cap=5)[1]
    assert len(capped) == 5
    assert extra[0] in split_for_loop(kb, 3, seed=13, extra=extra)[1]


def test_the_bot_names_the_right_entry_only_for_in_scope_questions():
    ids = {"a", "b"}
    assert feedback_for(Outcome("a", ("a", "b")), ids, "oos") == (True, "")
    assert feedback_for(Outcome("a", ("b", "a")), ids, "oos") == (False, "a")
    assert feedback_for(Outcome("a", no_answer=True), ids, "oos") == (False, "a")
    assert feedback_for(Outcome("oos", ("a",)), ids, "oos") == (False, "")
    assert feedback_for(Outcome("oos", no_answer=True), ids, "oos") is None
    assert feedback_for(Outcome("a", error="UNAVAILABLE: x"), ids, "oos") is None


@pytest.mark.parametrize("flag", [["--target", "h:1"], ["--sweep-thresholds"],
                                  ["--modality", "voice"], ["--loop-feedback-rate", "2"]])
def test_loop_refuses_flags_it_cannot_run_with(tmp_path, capsys, flag):
    path = tmp_path / "kb.csv"
    path.write_text("text,label\n" + "".join(f"q{i},a\nr{i},b\n" for i in range(10)))
    assert eval_main(parse(["--kb", str(path), "--loop", *flag])) == 2
    assert "error:" in capsys.readouterr().err


# Each entry: three plain paraphrases (the knowledge base keeps three), six in a slang the
# knowledge base lacks (the traffic), and a question in that slang that is scored.
FAMILIES = {
    "lost_card": (
        ["I lost my card", "my bank card is lost", "I cannot find my debit card"],
        ["someone nicked my plastic", "my plastic got pinched", "a thief swiped my plastic",
         "plastic got nicked from my bag", "lost the plastic on the bus",
         "my plastic has been nicked"],
        "somebody nicked my plastic"),
    "transfer_pending": (
        ["my transfer has not arrived", "the bank transfer is still pending",
         "when will my transfer arrive"],
        ["the dosh I sent my mate hasn't turned up", "sent my mate dosh and it never landed",
         "where has the dosh for my mate gone", "mate still hasn't got the dosh I sent",
         "my dosh for my mate is stuck", "dosh I wired my mate is missing"],
        "the dosh I sent to my mate never turned up"),
    "exchange_rate": (
        ["what is the exchange rate", "how much is a euro in dollars",
         "currency conversion rate"],
        ["how many quid for a buck", "what do I get in bucks for my quid",
         "quid to bucks today", "convert my quid into bucks", "bucks per quid right now",
         "what's a quid worth in bucks"],
        "how many bucks do I get for a quid"),
    "close_account": (
        ["I want to close my account", "how do I delete my account", "cancel my bank account"],
        ["I'm done with you lot, shut it all down", "shut down everything I have with you lot",
         "you lot are rubbish, shut my stuff down", "get me out, shut it all down",
         "want to ditch you lot for good", "ditch you lot and shut it down"],
        "done with you lot, shut the lot down"),
}
SEED = 13


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])


def family_csv(path):
    """The knowledge-base CSV, with each family's plain paraphrases where split_for_loop keeps
    (its choice depends only on the seed, the label and how many examples it has)."""
    rows = []
    for label, (plain, slang, _) in FAMILIES.items():
        slots = [Example(str(i), label) for i in range(len(plain) + len(slang))]
        kept = {int(e.text) for e in split_for_loop(slots, len(plain), SEED)[0]}
        texts = iter(plain), iter(slang)
        rows += [(next(texts[0] if i in kept else texts[1]), label) for i in range(len(slots))]
    write_csv(path, rows)


@pytest.mark.slow
def test_a_real_loop_learns_the_traffics_wording(tmp_path, capsys):
    kb, queries, out = tmp_path / "kb.csv", tmp_path / "queries.csv", tmp_path / "loop.json"
    family_csv(kb)
    write_csv(queries, [(q, label) for label, (_, _, q) in FAMILIES.items()])
    args = parse(["--kb", str(kb), "--queries", str(queries), "--loop", "--loop-paraphrases",
                  "3", "--loop-feedback-rate", "1", "--seed", str(SEED), "--concurrency", "4",
                  "--json-out", str(out)])
    assert eval_main(args) == 0
    result = json.loads(out.read_text())
    loop, before, after = result["loop"], result["before"], result["after"]
    assert result["config"]["kb_paraphrases"] == 12 and loop["traffic_asked"] == 24
    # The slang is what the knowledge base lacks: most of it goes wrong or unanswered first.
    assert before["accuracy_at_1"] <= 0.5
    assert loop["feedback_not_helpful_named"] >= 4
    assert loop["accepted"] >= 1
    # Feedback named the entries, so every added paraphrase is its own entry's.
    assert loop["paraphrases_added"] >= 4
    assert loop["added_right_entry"] == loop["paraphrases_added"]
    assert after["accuracy_at_1"] > before["accuracy_at_1"]
    assert after["accuracy_at_1"] >= 0.75
    printed = capsys.readouterr().out
    assert "before" in printed and "paraphrases added" in printed
