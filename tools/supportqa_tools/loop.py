"""The learning loop behind ``supportqa-server eval --loop``: a knowledge base built from a few
paraphrases per entry, the rest of its data asked as traffic, Feedback sent as a bot would,
every acceptable paraphrase suggestion accepted; the held-out queries scored before and after."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from supportqa.v1 import supportqa_pb2 as pb

from supportqa_tools.datasets import (
    Dataset,
    EvalInputError,
    Example,
    build_entries,
    read_examples,
)
from supportqa_tools.faq import is_faq_file
from supportqa_tools.metrics import Outcome, compute_metrics, fmt_cell

TRAFFIC_CONVERSATION = "supportqa-eval-loop-traffic"  # Question.metadata of the traffic
SCORING_CONVERSATION = "supportqa-eval-loop-scoring"  # of the scored queries, forgotten after
DEFAULT_TRAFFIC_SPLIT = "oos_train"  # CLINC150's out-of-scope train questions
MAX_SUGGESTIONS = 1000  # per Suggest call: one paraphrase suggestion per entry at most
# Metrics the before/after table compares, in this order (those compute_metrics gives).
COMPARED = ("accuracy_at_1", "in_scope_accuracy", "recall_at_5", "mrr", "no_answer_rate",
            "no_answer_precision", "no_answer_recall", "no_answer_f1", "clarify_rate",
            "clarify_hit_rate",
            "latency_ms_p50", "n_queries", "n_errors")


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the --loop flags to the parser of ``supportqa-server eval``."""
    loop = parser.add_argument_group("learning loop (--loop)")
    loop.add_argument(
        "--loop", action="store_true",
        help="build the knowledge base from --loop-paraphrases per entry, ask the rest as "
        "traffic, send Feedback, accept every paraphrase suggestion; score the queries "
        "before and after")
    loop.add_argument("--loop-paraphrases", type=int, default=5, metavar="K",
                      help="knowledge-base paraphrases kept per entry; the rest is traffic")
    loop.add_argument("--loop-traffic", type=int, default=3000, metavar="N",
                      help="traffic questions asked at most (shuffled by --seed)")
    loop.add_argument("--loop-feedback-rate", type=float, default=0.5, metavar="P",
                      help="share of the traffic whose customer says whether it helped")
    loop.add_argument(
        "--loop-traffic-split", action="append", default=[], metavar="SPLIT",
        help="JSON split(s) of the --kb file asked as traffic too (out-of-scope questions); "
        f"default: {DEFAULT_TRAFFIC_SPLIT} when the file has it and --no-answer-label is set")
    loop.add_argument("--loop-rounds", type=int, default=5,
                      help="Suggest + accept rounds at most (a suggestion lists at most 20 "
                      "questions; the rest come in the next round)")


def check_loop_args(args: argparse.Namespace) -> None:
    """Raises EvalInputError naming the first flag --loop cannot run with."""
    if args.loop_paraphrases < 1:
        raise EvalInputError(f"--loop-paraphrases must be at least 1, got {args.loop_paraphrases}")
    if args.loop_traffic < 1:
        raise EvalInputError(f"--loop-traffic must be at least 1, got {args.loop_traffic}")
    if not 0 <= args.loop_feedback_rate <= 1:
        raise EvalInputError(
            f"--loop-feedback-rate must be in [0, 1], got {args.loop_feedback_rate}")
    if args.loop_rounds < 1:
        raise EvalInputError(f"--loop-rounds must be at least 1, got {args.loop_rounds}")
    clash = [flag for flag, on in (
        ("--target", args.target), ("--no-upsert", args.no_upsert),
        ("--sweep-thresholds", args.sweep_thresholds), ("--adapt", getattr(args, "adapt", None)),
        (f"--modality {args.modality}", args.modality != "text"),
        ("a StackFAQ --kb", is_faq_file(Path(args.kb)))) if on]
    if clash:
        raise EvalInputError(f"--loop writes a fresh knowledge base and question log on the "
                             f"in-process server and asks typed text: drop {clash[0]}")


@dataclass
class LoopData:
    """What the loop writes, replays and scores."""

    kb: list[Example]  # the kept paraphrases, --loop-paraphrases per label
    traffic: list[Example]  # the rest, and out-of-scope questions, shuffled and capped
    queries: list[Example]  # the held-out queries, scored before and after


def split_for_loop(kb: Sequence[Example], paraphrases: int, seed: int,
                   extra: Sequence[Example] = (), cap: int | None = None) -> tuple[
                       list[Example], list[Example]]:
    """Keeps ``paraphrases`` of each label's examples for the knowledge base; the others,
    with ``extra``, become the traffic.

    A label's kept examples depend only on (seed, label, its examples in order).

    Returns:
        (kept, traffic): kept in input order; traffic shuffled by seed, at most ``cap``.
    """
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(kb):
        by_label[example.label].append(i)
    kept: set[int] = set()
    for label, indices in by_label.items():
        chosen = list(indices)
        random.Random(f"{seed}:loop:{label}").shuffle(chosen)
        kept.update(chosen[:paraphrases])
    traffic = [e for i, e in enumerate(kb) if i not in kept] + list(extra)
    random.Random(f"{seed}:loop").shuffle(traffic)
    return [e for i, e in enumerate(kb) if i in kept], traffic[:cap]


def _extra_traffic(args: argparse.Namespace) -> list[Example]:
    splits = list(args.loop_traffic_split)
    if not splits:
        if not args.no_answer_label or DEFAULT_TRAFFIC_SPLIT in args.kb_split + args.queries_split:
            return []
        try:
            return read_examples(args.kb, [DEFAULT_TRAFFIC_SPLIT])
        except EvalInputError:  # a CSV, or a JSON file without that split
            return []
    return read_examples(args.kb, splits, split_flag="--loop-traffic-split")


def loop_data(args: argparse.Namespace, dataset: Dataset) -> LoopData:
    """The loop's knowledge base, traffic and queries from the eval data set and flags.

    Raises:
        EvalInputError: A flag is unusable or a traffic split cannot be read.
    """
    check_loop_args(args)
    kb, traffic = split_for_loop(dataset.kb, args.loop_paraphrases, args.seed,
                                 _extra_traffic(args), args.loop_traffic)
    if not traffic:
        raise EvalInputError(f"no traffic: every label has at most {args.loop_paraphrases} "
                             "examples; lower --loop-paraphrases")
    return LoopData(kb, traffic, list(dataset.queries))


def feedback_for(outcome: Outcome, entry_ids: set[str], no_answer_label: str | None
                 ) -> tuple[bool, str] | None:
    """The Feedback (helpful, entry named) a bot sends for a replayed question whose customer
    says something: helpful for a right answer; not helpful naming the right entry for a wrong
    answer or a NoAnswer to an in-scope question; not helpful naming none for an answer to an
    out-of-scope one. None for a NoAnswer to an out-of-scope question or a failed call."""
    if outcome.error is not None:
        return None
    in_scope = outcome.label != no_answer_label and outcome.label in entry_ids
    right = not outcome.no_answer and outcome.ranked[:1] == (outcome.label,)
    if in_scope:
        return (True, "") if right else (False, outcome.label)
    return None if outcome.no_answer else (False, "")


def outcome_of(label: str, reply: pb.AnswerSet, latency_ms: float) -> Outcome:
    answers = sorted(reply.answers, key=lambda a: a.rank)
    return Outcome(label, ranked=tuple(a.entry_id for a in answers),
                   scores=tuple(a.score for a in answers),
                   no_answer=reply.HasField("no_answer"), latency_ms=latency_ms,
                   clarify=tuple(o.entry_id for o in reply.clarify.options))


class InConversation:
    """A client whose questions carry one conversation id (Question.metadata), so the question
    log can forget them together; its other calls pass through."""

    def __init__(self, client: Any, conversation_id: str) -> None:
        self._client = client
        self.conversation_id = conversation_id

    async def ask(self, text: str = "", **kwargs: Any) -> pb.AnswerSet:
        return await self._client.ask(
            text, metadata={"conversation_id": self.conversation_id}, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def _each(n: int, concurrency: int, fn) -> None:
    """Runs await fn(i) for i in range(n) with ``concurrency`` callers."""
    tickets = itertools.count()

    async def caller() -> None:
        while (i := next(tickets)) < n:
            await fn(i)

    await asyncio.gather(*(caller() for _ in range(min(concurrency, n))))


async def replay(client: Any, traffic: Sequence[Example], *, knowledge_base: str,
                 top_k: int, min_score: float | None, concurrency: int
                 ) -> list[tuple[Outcome, str]]:
    """Asks the traffic; per question its Outcome and request id ("" when the call failed)."""
    done: list[tuple[Outcome, str] | None] = [None] * len(traffic)

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            reply = await client.ask(traffic[i].text, knowledge_base=knowledge_base,
                                     top_k=top_k, min_score=min_score)
        except Exception as e:  # noqa: BLE001 - a failed question is counted, not the end
            done[i] = (Outcome(traffic[i].label, error=f"{type(e).__name__}: {e}"), "")
        else:
            done[i] = (outcome_of(traffic[i].label, reply, (time.perf_counter() - t0) * 1000),
                       reply.request_id)

    await _each(len(traffic), concurrency, one)
    return [d for d in done if d is not None]


@dataclass
class LoopCounts:
    """What the loop did, for the report."""

    traffic_asked: int = 0
    traffic_errors: int = 0
    feedback_sent: int = 0
    feedback_helpful: int = 0
    feedback_not_helpful_named: int = 0  # naming the right entry
    feedback_not_helpful_unnamed: int = 0  # out of scope: no entry named
    feedback_failed: int = 0
    rounds: int = 0
    suggestions: int = 0  # distinct suggestions seen over the rounds
    paraphrase_suggestions: int = 0
    accepted: int = 0
    blocked: int = 0
    accept_failed: int = 0
    new_entry_skipped: int = 0  # distinct new-entry suggestions, not accepted
    new_entry_questions: int = 0  # logged questions they stand for (latest round)
    paraphrases_added: int = 0
    added_right_entry: int = 0  # the traffic label of the text is the entry
    added_other_entry: int = 0
    added_out_of_scope: int = 0  # an out-of-scope traffic question became a paraphrase
    added_unknown: int = 0  # not a traffic text as asked (masked in the log)
    scoring_forgotten: int = 0  # scored questions deleted from the log after "before"
    seconds: dict[str, float] = field(default_factory=dict)


async def send_feedback(client: Any, asked: Sequence[tuple[Outcome, str]], *,
                        knowledge_base: str, entry_ids: set[str], rate: float, seed: int,
                        no_answer_label: str | None, concurrency: int,
                        counts: LoopCounts) -> None:
    """Sends Feedback for a ``rate`` share of the replayed questions, drawn by seed (one draw
    per question, in traffic order), as feedback_for says."""
    rng = random.Random(f"{seed}:feedback")
    todo = []
    for outcome, request_id in asked:
        says = rng.random() < rate
        verdict = feedback_for(outcome, entry_ids, no_answer_label)
        if says and verdict is not None and request_id:
            todo.append((request_id, *verdict))

    async def one(i: int) -> None:
        request_id, helpful, entry_id = todo[i]
        try:
            await client.feedback(request_id, helpful, entry_id=entry_id,
                                  knowledge_base=knowledge_base)
        except Exception as e:  # noqa: BLE001 - counted; the loop goes on
            counts.feedback_failed += 1
            if counts.feedback_failed == 1:
                print(f"warning: feedback failed: {e}", file=sys.stderr)
            return
        counts.feedback_sent += 1
        if helpful:
            counts.feedback_helpful += 1
        elif entry_id:
            counts.feedback_not_helpful_named += 1
        else:
            counts.feedback_not_helpful_unnamed += 1

    await _each(len(todo), concurrency, one)


async def accept_suggestions(client: Any, knowledge_base: str, rounds: int,
                             counts: LoopCounts) -> set[str]:
    """Suggest, then accept every paraphrase suggestion that is not blocked (the client's
    accept: Get + Upsert, as `supportqa accept`), for up to ``rounds`` rounds or until one
    accepts nothing; new-entry suggestions are counted and skipped. Returns the entries
    extended."""
    seen: set[str] = set()
    new_entries: set[str] = set()
    extended: set[str] = set()
    for _ in range(rounds):
        found = await client.suggest(knowledge_base, max_suggestions=MAX_SUGGESTIONS)
        counts.rounds += 1
        accepted = 0
        counts.new_entry_questions = 0
        for s in found:
            fresh = s.id not in seen
            seen.add(s.id)
            if s.kind == pb.SUGGESTION_KIND_NEW_ENTRY:
                new_entries.add(s.id)
                counts.new_entry_questions += s.asked
                continue
            counts.paraphrase_suggestions += fresh
            if s.blocked:
                counts.blocked += fresh
                continue
            try:
                await client.accept(s, knowledge_base=knowledge_base)
            except Exception as e:  # noqa: BLE001 - counted; the next suggestion goes on
                counts.accept_failed += 1
                print(f"warning: accepting {s.id} for {s.entry_id!r} failed: {e}",
                      file=sys.stderr)
                continue
            accepted += 1
            extended.add(s.entry_id)
        counts.accepted += accepted
        print(f"round {counts.rounds}: {len(found)} suggestions, {accepted} accepted",
              file=sys.stderr)
        if not accepted:
            break
    counts.suggestions = len(seen)
    counts.new_entry_skipped = len(new_entries)
    return extended


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


async def count_added(client: Any, knowledge_base: str, extended: set[str],
                      entries: Sequence[pb.Entry], traffic: Sequence[Example],
                      no_answer_label: str | None, counts: LoopCounts) -> None:
    """Counts the paraphrases the accepted suggestions added (each extended entry as Get
    returns it now, against what was written first) and whose traffic label they carry."""
    before = {e.id: {_normal(t) for t in (e.title, *e.questions)} for e in entries}
    labels: dict[str, set[str]] = defaultdict(set)
    for example in traffic:
        labels[_normal(example.text)].add(example.label)
    for entry_id in sorted(extended):
        now = await client.get(entry_id, knowledge_base=knowledge_base)
        for text in now.questions:
            key = _normal(text)
            if key in before.get(entry_id, ()):
                continue
            counts.paraphrases_added += 1
            if entry_id in labels[key]:
                counts.added_right_entry += 1
            elif no_answer_label in labels[key]:
                counts.added_out_of_scope += 1
            elif labels[key]:
                counts.added_other_entry += 1
            else:
                counts.added_unknown += 1


def scored(outcomes: Sequence[Outcome], no_answer_label: str | None) -> dict:
    """compute_metrics, and ``no_answer_rate``: the share of questions answered NoAnswer."""
    metrics = compute_metrics(outcomes, no_answer_label)
    metrics["no_answer_rate"] = sum(o.no_answer for o in outcomes) / max(len(outcomes), 1)
    return metrics


async def _threshold(client: Any, knowledge_base: str) -> tuple[float, str]:
    reply = await client.stats(knowledge_base)
    kb = reply.knowledge_bases[0] if reply.knowledge_bases else None
    return (kb.threshold, kb.threshold_source) if kb else (float("nan"), "")


async def run_loop(client: Any, data: LoopData, args: argparse.Namespace) -> dict:
    """The loop on a fresh knowledge base: write, score, replay, Feedback, accept, score.

    Returns:
        {"before": metrics, "after": metrics, "loop": LoopCounts as a dict}; each metrics
        dict also holds "threshold" and "threshold_source" from Stats.
    """
    from supportqa_tools.evaluation import ask_all, upsert_entries, wait_for_head

    kb_name, counts, clock = args.knowledge_base, LoopCounts(), time.perf_counter()
    entries = build_entries(data.kb, kb_name)
    label = args.no_answer_label

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        counts.seconds[name] = round(now - clock, 1)
        clock = now

    async def score() -> dict:
        await wait_for_head(client, kb_name)
        outcomes = await ask_all(
            InConversation(client, SCORING_CONVERSATION), data.queries,
            [None] * len(data.queries), modality="text", knowledge_base=kb_name,
            top_k=args.top_k, min_score=args.min_score, concurrency=args.concurrency)
        metrics = scored(outcomes, label)
        metrics["threshold"], metrics["threshold_source"] = await _threshold(client, kb_name)
        return metrics

    await upsert_entries(client, entries)
    lap("write")
    before = await score()
    counts.scoring_forgotten = await client.delete_questions(
        SCORING_CONVERSATION, knowledge_base=kb_name)
    lap("score_before")
    asked = await replay(InConversation(client, TRAFFIC_CONVERSATION), data.traffic,
                         knowledge_base=kb_name, top_k=args.top_k, min_score=args.min_score,
                         concurrency=args.concurrency)
    counts.traffic_asked = len(asked)
    counts.traffic_errors = sum(o.error is not None for o, _ in asked)
    lap("traffic")
    await send_feedback(client, asked, knowledge_base=kb_name,
                        entry_ids={e.id for e in entries}, rate=args.loop_feedback_rate,
                        seed=args.seed, no_answer_label=label, concurrency=args.concurrency,
                        counts=counts)
    lap("feedback")
    extended = await accept_suggestions(client, kb_name, args.loop_rounds, counts)
    await count_added(client, kb_name, extended, entries, data.traffic, label, counts)
    lap("suggest_accept")
    after = await score()
    lap("score_after")
    return {"before": before, "after": after, "loop": asdict(counts),
            "traffic": scored([o for o, _ in asked], label)}


async def _run_in_process(args: argparse.Namespace, data: LoopData, client_factory) -> dict:
    from supportqa_server.api.server import running_server
    from supportqa_server.runtime.settings import Settings

    from supportqa_tools.evaluation import ROUTES_OFF

    async with contextlib.AsyncExitStack() as stack:
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="supportqa-loop-"))
        print("starting an in-process server on a fresh store", file=sys.stderr)
        settings = Settings(data_dir=data_dir, port=0, **ROUTES_OFF["text"])
        target = await stack.enter_async_context(running_server(settings))
        client = await stack.enter_async_context(client_factory(target))
        return await run_loop(client, data, args)


def format_before_after(before: dict, after: dict) -> str:
    """The compared metrics and the threshold, before and after, side by side."""
    keys = [k for k in (*COMPARED, "threshold") if k in before]
    lines = [f"{'':<20}{'before':>10}{'after':>10}{'change':>10}"]
    for k in keys:
        b, a = before[k], after[k]
        change = (f"{a - b:+.3f}" if abs(a - b) < 10 else f"{a - b:+.1f}") if isinstance(
            a, float) and isinstance(b, float) else ""
        lines.append(f"{k:<20}{fmt_cell(b):>10}{fmt_cell(a):>10}{change:>10}")
    lines.append(f"threshold before: {before['threshold_source']}")
    lines.append(f"threshold after:  {after['threshold_source']}")
    return "\n".join(lines)


def format_counts(c: dict, traffic: dict) -> str:
    """The loop's own counts, in a few lines."""
    acc = traffic.get("accuracy_at_1")
    return "\n".join([
        f"traffic asked {c['traffic_asked']} ({c['traffic_errors']} failed; its accuracy@1 "
        f"{fmt_cell(acc)})",
        f"feedback sent {c['feedback_sent']}: helpful {c['feedback_helpful']}, not helpful "
        f"naming the right entry {c['feedback_not_helpful_named']}, not helpful naming none "
        f"{c['feedback_not_helpful_unnamed']} ({c['feedback_failed']} failed)",
        f"suggestions {c['suggestions']} over {c['rounds']} round(s): paraphrases "
        f"{c['paraphrase_suggestions']} (accepted {c['accepted']}, blocked {c['blocked']}, "
        f"failed {c['accept_failed']}), new entries skipped {c['new_entry_skipped']} "
        f"({c['new_entry_questions']} questions)",
        f"paraphrases added {c['paraphrases_added']}: to the right entry "
        f"{c['added_right_entry']}, to another entry {c['added_other_entry']}, out-of-scope "
        f"questions {c['added_out_of_scope']}, unknown {c['added_unknown']}",
        "seconds: " + ", ".join(f"{k} {v:g}" for k, v in c["seconds"].items()),
    ])


def loop_main(args: argparse.Namespace, dataset: Dataset, client_factory) -> int:
    """Runs ``supportqa-server eval --loop``; returns the exit code as eval_main does."""
    from supportqa_tools.evaluation import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUN_FAILED, EvalRunError

    try:
        data = loop_data(args, dataset)
    except EvalInputError as e:
        print(f"supportqa-server eval: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"loop: {len(data.kb)} knowledge-base paraphrases in "
          f"{len({e.label for e in data.kb})} entries, {len(data.traffic)} traffic questions, "
          f"{len(data.queries)} queries", file=sys.stderr)
    try:
        result = asyncio.run(_run_in_process(args, data, client_factory))
    except EvalRunError as e:
        print(f"supportqa-server eval: error: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    result["config"] = {
        "kb": str(args.kb), "kb_split": args.kb_split, "queries_split": args.queries_split,
        "dev_fraction": args.dev_fraction, "seed": args.seed,
        "no_answer_label": args.no_answer_label,
        "limit": args.limit, "loop_paraphrases": args.loop_paraphrases,
        "loop_traffic": args.loop_traffic, "loop_feedback_rate": args.loop_feedback_rate,
        "loop_rounds": args.loop_rounds, "kb_paraphrases": len(data.kb),
        "entries": len({e.label for e in data.kb}), "traffic": len(data.traffic),
        "traffic_out_of_scope": sum(e.label == args.no_answer_label for e in data.traffic),
        "queries": len(data.queries), "top_k": args.top_k, "min_score": args.min_score,
        "concurrency": args.concurrency,
    }
    cfg = result["config"]
    print(f"learning loop: {cfg['entries']} entries from {cfg['kb_paraphrases']} paraphrases "
          f"({args.loop_paraphrases} per entry), {cfg['traffic']} traffic questions "
          f"({cfg['traffic_out_of_scope']} out of scope), feedback rate "
          f"{args.loop_feedback_rate:g}, {cfg['queries']} queries scored before and after")
    print(format_before_after(result["before"], result["after"]))
    print(format_counts(result["loop"], result["traffic"]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    failed = {k: result[k]["n_errors"] for k in ("before", "after", "traffic")}
    if any(failed.values()):
        print("warning: failed calls count as misses (before, after, traffic: "
              f"{', '.join(map(str, failed.values()))}); RESOURCE_EXHAUSTED means the "
              "server shed load: lower --concurrency or set SUPPORTQA_MAX_QUEUE_MS=0",
              file=sys.stderr)
    if result["after"]["n_errors"] == result["after"]["n_queries"]:
        print("supportqa-server eval: error: every query failed", file=sys.stderr)
        return EXIT_RUN_FAILED
    return EXIT_OK

