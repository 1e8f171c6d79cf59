"""Evaluation harness behind ``supportqa-server eval``: accuracy, no-answer quality, latency."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from supportqa.v1 import supportqa_pb2

from supportqa_tools.datasets import (  # noqa: F401 - re-exported for callers of the harness
    LABEL_COLUMNS,
    TEXT_COLUMNS,
    Dataset,
    EvalInputError,
    Example,
    build_dataset,
    build_entries,
    read_csv_examples,
    read_examples,
    read_json_examples,
    readable_label,
    stratified_split,
)
from supportqa_tools.faq import SHAPES, bm25_outcomes, faq_entries, is_faq_file, read_faq
from supportqa_tools.metrics import (  # noqa: F401 - re-exported for callers of the harness
    Outcome,
    apply_threshold,
    best_threshold,
    compute_metrics,
    format_metrics,
    format_sweep,
    sweep_thresholds,
    threshold_grid,
)

MODALITIES = ("text", "voice", "image")
# Models an in-process server need not load for a modality (Settings overrides).
ROUTES_OFF: dict[str, dict[str, Any]] = {
    "text": {"speech_model": "", "ocr": False},
    "voice": {"ocr": False},
    "image": {"speech_model": ""},
}
UPSERT_BATCH_ENTRIES = 8  # entries per Upsert stream; ~100 paraphrases each in BANKING77

# Exit codes of eval_main.
EXIT_OK = 0
EXIT_RUN_FAILED = 1  # the server failed or every query failed
EXIT_BAD_INPUT = 2  # bad flags or input files, as argparse does for usage errors


class EvalRunError(RuntimeError):
    """The server could not be started, written to or asked."""


def _batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _error_code(e: BaseException) -> str | None:
    code = getattr(e, "code", None)
    return getattr(code, "name", None)


def prepare_inputs(
    queries: Sequence[Example],
    modality: str,
    *,
    cache_dir: str | Path,
    seed: int,
    voice: str,
    workers: int | None = None,
) -> list[Path | None]:
    """Synthesises the voice or image form of every query into the on-disk cache.

    Args:
        queries: The queries.
        modality: "text" (nothing to do), "voice" or "image".
        cache_dir: Root of the cache.
        seed: Seed of the image renderings.
        voice: espeak-ng voice.
        workers: Threads; defaults to the CPU count.

    Returns:
        Per query, the cached file, or None for text.

    Raises:
        supportqa_tools.synth.SynthesisError: espeak-ng is missing or failed.
    """
    if modality == "text":
        return [None] * len(queries)
    from supportqa_tools import synth

    def one(example: Example) -> Path:
        if modality == "voice":
            synth.synthesize_speech(example.text, voice=voice, cache_dir=cache_dir)
            return synth.speech_cache_path(example.text, cache_dir, voice=voice)
        synth.cached_screenshot(example.text, cache_dir, seed=seed)
        return synth.screenshot_cache_path(example.text, cache_dir, seed=seed)

    print(f"synthesising {len(queries)} {modality} queries into {cache_dir}", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(one, queries))


def _request_kwargs(example: Example, modality: str, path: Path | None) -> dict[str, Any]:
    if modality == "voice":
        return {"audio": path.read_bytes(), "audio_format": "wav"}
    if modality == "image":
        return {"image": path.read_bytes(), "image_mime": "image/jpeg"}
    return {"text": example.text}


async def upsert_entries(client: Any, entries: Sequence[supportqa_pb2.Entry]) -> int:
    """Writes entries in batches and returns the number of rows written.

    Raises:
        EvalRunError: The server rejected an entry or the call failed.
    """
    rows = 0
    done = 0
    for batch in _batched(entries, UPSERT_BATCH_ENTRIES):
        try:
            summary = await client.upsert(iter(batch))
        except Exception as e:
            if _error_code(e) is None:
                raise
            raise EvalRunError(f"upserting the knowledge base failed: {e}") from e
        if summary.failures:
            failure = summary.failures[0]
            raise EvalRunError(
                f"the server rejected entry {failure.entry_id!r}: {failure.code} {failure.message}"
            )
        rows += summary.rows
        done += len(batch)
        print(f"upserted {done}/{len(entries)} entries ({rows} rows)", file=sys.stderr)
    return rows


def settling(kb_stats: Any) -> bool:
    """Whether a knowledge base's entry head or its threshold's calibration is still to come
    (KnowledgeBaseStats.head, .threshold_source)."""
    source = kb_stats.threshold_source
    return kb_stats.head == "training" or "while calibrating" in source or "re-measuring" in source


async def wait_for_head(client: Any, knowledge_base: str, timeout_s: float = 300.0) -> str:
    """Waits while the server trains the knowledge base's entry head and calibrates its
    threshold, so every query is answered the way a settled knowledge base is; returns the
    head's final state.

    Raises:
        EvalRunError: Still training after timeout_s.
    """
    deadline = time.monotonic() + timeout_s
    t0 = time.perf_counter()
    while True:
        reply = await client.stats(knowledge_base)
        kb = reply.knowledge_bases[0] if reply.knowledge_bases else None
        if kb is None or not settling(kb):
            state = kb.head if kb else "off"
            print(f"entry head: {state or 'unknown'}; threshold "
                  f"{kb.threshold if kb else 0:.3f}, {kb.threshold_source if kb else ''} "
                  f"(waited {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            return state
        if time.monotonic() > deadline:
            raise EvalRunError(f"the entry head of {knowledge_base!r} was still training "
                               f"after {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


async def ask_all(
    client: Any,
    queries: Sequence[Example],
    inputs: Sequence[Path | None],
    *,
    modality: str,
    knowledge_base: str,
    top_k: int,
    min_score: float | None,
    concurrency: int,
    language: str = "",
) -> list[Outcome]:
    """Asks every query with ``concurrency`` callers and records what came back.

    A failed call becomes an Outcome with "STATUS_NAME: details" in ``error``; it does not
    stop the run.

    Args:
        client: An ``AsyncSupportClient`` or anything with its ``ask``.
        queries: The queries.
        inputs: Per query, the synthesised audio or image file (None for text).
        modality: "text", "voice" or "image".
        knowledge_base: Knowledge base to ask.
        top_k: Answers per query.
        min_score: Threshold override; None uses the server's.
        concurrency: Concurrent callers.
        language: Spoken-language hint for voice.

    Returns:
        One Outcome per query, in query order.
    """
    outcomes: list[Outcome | None] = [None] * len(queries)
    tickets = itertools.count()
    finished = itertools.count(1)
    report_every = max(1, len(queries) // 10)
    start = time.perf_counter()

    async def caller() -> None:
        while (i := next(tickets)) < len(queries):
            example = queries[i]
            kwargs = _request_kwargs(example, modality, inputs[i])
            if modality == "voice" and language:
                kwargs["language"] = language
            t0 = time.perf_counter()
            try:
                reply = await client.ask(
                    **kwargs, knowledge_base=knowledge_base, top_k=top_k, min_score=min_score
                )
            except Exception as e:  # noqa: BLE001 - a failed query is a data point, not the end
                code = _error_code(e) or type(e).__name__
                details = getattr(e, "details", None) or str(e)
                outcomes[i] = Outcome(example.label, error=f"{code}: {details}")
            else:
                answers = sorted(reply.answers, key=lambda a: a.rank)
                outcomes[i] = Outcome(
                    example.label,
                    ranked=tuple(a.entry_id for a in answers),
                    scores=tuple(a.score for a in answers),
                    no_answer=reply.HasField("no_answer"),
                    latency_ms=(time.perf_counter() - t0) * 1000,
                    clarify=tuple(o.entry_id for o in reply.clarify.options),
                )
            done = next(finished)
            if done % report_every == 0:
                rate = done / (time.perf_counter() - start)
                print(f"asked {done}/{len(queries)} ({rate:.1f} queries/s)", file=sys.stderr)

    await asyncio.gather(*(caller() for _ in range(min(concurrency, len(queries)))))
    return [o for o in outcomes if o is not None]


ClientFactory = Callable[[str], Any]


async def _evaluate(
    args: argparse.Namespace,
    entries: Sequence[supportqa_pb2.Entry],
    dataset: Dataset,
    inputs: Sequence[Path | None],
    client_factory: ClientFactory,
) -> tuple[list[Outcome], float]:
    async with contextlib.AsyncExitStack() as stack:
        target = args.target
        if target is None:
            from supportqa_server.api.server import running_server
            from supportqa_server.runtime.settings import Settings

            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="supportqa-eval-"))
            print("starting an in-process server on a fresh store", file=sys.stderr)
            model = {"text_model": str(args.adapt)} if getattr(args, "adapt", None) else {}
            settings = Settings(data_dir=data_dir, port=0, **ROUTES_OFF[args.modality], **model)
            target = await stack.enter_async_context(running_server(settings))
        client = await stack.enter_async_context(client_factory(target))
        if not args.no_upsert:
            await upsert_entries(client, entries)
        await wait_for_head(client, args.knowledge_base)
        start = time.perf_counter()
        outcomes = await ask_all(
            client,
            dataset.queries,
            inputs,
            modality=args.modality,
            knowledge_base=args.knowledge_base,
            top_k=args.top_k,
            min_score=0.0 if args.sweep_thresholds else args.min_score,
            concurrency=args.concurrency,
            language=args.language,
        )
        return outcomes, time.perf_counter() - start


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flags of ``supportqa-server eval`` to parser."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--kb", required=True, metavar="FILE", help="CSV (text,label) or CLINC150-style JSON"
    )
    data.add_argument(
        "--queries", metavar="FILE", help="CSV or JSON of queries; default: the --kb file"
    )
    data.add_argument(
        "--kb-split", action="append", default=[], metavar="SPLIT", help="JSON split(s) for --kb"
    )
    data.add_argument(
        "--queries-split",
        action="append",
        default=[],
        metavar="SPLIT",
        help="JSON split(s) for --queries; default: the --kb splits when the file is the same",
    )
    data.add_argument(
        "--dev-fraction",
        type=float,
        default=0.2,
        help="share of each label held back as queries when --kb and --queries are the same",
    )
    data.add_argument(
        "--kb-shape", choices=SHAPES, default="article",
        help="for a StackFAQ-style --kb of articles: one entry per article as an article "
        "(body split into passages), as a passage (title + answer text) or as text alone",
    )
    data.add_argument("--bm25", action="store_true",
                      help="also score BM25 over the same entries and queries (always on for "
                      "articles): the baseline to beat")
    data.add_argument("--seed", type=int, default=13, help="seed of splits, shuffles, images")
    data.add_argument(
        "--no-answer-label", metavar="LABEL", help="label whose right answer is NoAnswer (oos)"
    )
    data.add_argument("--limit", type=int, help="ask only the first N queries after shuffling")
    data.add_argument("--modality", choices=MODALITIES, default="text", help="how to ask")
    data.add_argument(
        "--cache-dir", default=".cache/eval", help="where synthesised audio and images are kept"
    )
    data.add_argument("--voice", default="en-us", help="espeak-ng voice for --modality voice")
    data.add_argument("--language", default="", help="spoken-language hint sent with audio")
    server = parser.add_argument_group("server")
    server.add_argument(
        "--target", metavar="HOST:PORT", help="evaluate a running server; default: start one"
    )
    server.add_argument("--api-key", help="API key for --target")
    server.add_argument("--knowledge-base", default="eval", help="knowledge base to write and ask")
    server.add_argument(
        "--no-upsert", action="store_true", help="ask without writing the knowledge base first"
    )
    server.add_argument(
        "--adapt",
        metavar="DIR",
        help="fine-tune the text encoder (SUPPORTQA_TEXT_MODEL, default the bundled MiniLM) on the "
        "knowledge-base side first (as supportqa-server "
        "adapt; reused when DIR already holds the same adaptation) and serve with it",
    )
    server.add_argument("--adapt-epochs", type=int, default=1, help="epochs of --adapt")
    asking = parser.add_argument_group("asking")
    asking.add_argument("--top-k", type=int, default=5, help="answers per query (1..50)")
    asking.add_argument(
        "--min-score", type=float, help="threshold override in [0, 1]; default: the server's"
    )
    asking.add_argument("--concurrency", type=int, default=8, help="concurrent queries")
    asking.add_argument("--timeout", type=float, default=60.0, help="deadline per call, seconds")
    asking.add_argument(
        "--sweep-thresholds",
        action="store_true",
        help="ask with min_score=0 and tabulate metrics over thresholds",
    )
    asking.add_argument("--sweep-step", type=float, default=0.02, help="threshold grid spacing")
    parser.add_argument("--json-out", metavar="FILE", help="write the metrics as JSON")
    from supportqa_tools.loop import add_loop_arguments

    add_loop_arguments(parser)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.dev_fraction < 1:
        raise EvalInputError(f"--dev-fraction must be in (0, 1), got {args.dev_fraction}")
    if not 1 <= args.top_k <= 50:
        raise EvalInputError(f"--top-k must be in 1..50, got {args.top_k}")
    if args.min_score is not None and not 0 <= args.min_score <= 1:
        raise EvalInputError(f"--min-score must be in [0, 1], got {args.min_score}")
    if args.concurrency < 1:
        raise EvalInputError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.limit is not None and args.limit < 1:
        raise EvalInputError(f"--limit must be at least 1, got {args.limit}")
    if not 0 < args.sweep_step <= 0.5:
        raise EvalInputError(f"--sweep-step must be in (0, 0.5], got {args.sweep_step}")
    if args.timeout <= 0:
        raise EvalInputError(f"--timeout must be positive, got {args.timeout}")


def load_dataset(args: argparse.Namespace) -> Dataset:
    """Reads the --kb and --queries files and builds the data set the flags describe.

    Raises:
        EvalInputError: A file or flag is unusable.
    """
    _check_args(args)
    kb_path = Path(args.kb)
    if is_faq_file(kb_path):
        articles, queries = read_faq(kb_path)
        return build_dataset([Example(a.title, a.id) for a in articles], queries,
                             same_source=False, seed=args.seed, limit=args.limit)
    queries_path = Path(args.queries) if args.queries else kb_path
    kb_splits = list(args.kb_split)
    queries_splits = list(args.queries_split)
    if not queries_splits and queries_path.resolve() == kb_path.resolve():
        queries_splits = kb_splits
    kb_examples = read_examples(kb_path, kb_splits, split_flag="--kb-split")
    same_source = queries_path.resolve() == kb_path.resolve() and sorted(kb_splits) == sorted(
        queries_splits
    )
    query_examples = (
        kb_examples
        if same_source
        else read_examples(queries_path, queries_splits, split_flag="--queries-split")
    )
    dataset = build_dataset(
        kb_examples,
        query_examples,
        same_source=same_source,
        no_answer_label=args.no_answer_label,
        dev_fraction=args.dev_fraction,
        seed=args.seed,
        limit=args.limit,
    )
    if not dataset.kb:
        raise EvalInputError(f"{kb_path}: no knowledge-base examples left once no-answer rows go")
    if not dataset.queries:
        raise EvalInputError(f"{queries_path}: no queries")
    return dataset


def _default_client_factory(args: argparse.Namespace) -> ClientFactory:
    from supportqa.client import AsyncSupportClient

    return lambda target: AsyncSupportClient(target, timeout=args.timeout, api_key=args.api_key)


def eval_main(args: argparse.Namespace, *, client_factory: ClientFactory | None = None) -> int:
    """Runs ``supportqa-server eval`` with parsed arguments.

    Args:
        args: Parsed by a parser that ``add_eval_arguments`` set up.
        client_factory: Makes the async-context-manager client for a target; defaults to
            ``supportqa.client.AsyncSupportClient``. Tests pass a fake.

    Returns:
        The exit code: 0 when the evaluation ran, 1 when the server failed or every query
        failed, 2 on bad flags or input files.
    """
    try:
        dataset = load_dataset(args)
    except EvalInputError as e:
        print(f"supportqa-server eval: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for warning in dataset.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if getattr(args, "loop", False):
        from supportqa_tools.loop import loop_main

        return loop_main(args, dataset, client_factory or _default_client_factory(args))
    faq = is_faq_file(Path(args.kb))
    entries = (faq_entries(read_faq(args.kb)[0], args.knowledge_base, args.kb_shape) if faq
               else build_entries(dataset.kb, args.knowledge_base))
    adapted = None
    if getattr(args, "adapt", None):
        from supportqa_tools.adapt import AdaptOptions, adapt

        if args.target:
            print("supportqa-server eval: error: --adapt needs the in-process server; the "
                  "--target server keeps its own model", file=sys.stderr)
            return EXIT_BAD_INPUT
        from supportqa_server.runtime.settings import Settings

        # from the configured text model (SUPPORTQA_TEXT_MODEL), the one served without --adapt
        adapted = adapt([[e.title, *e.questions] for e in entries], args.adapt,
                        base_model=Settings().text_model,
                        options=AdaptOptions(epochs=args.adapt_epochs))
    from supportqa_tools.synth import SynthesisError

    try:
        inputs = prepare_inputs(
            dataset.queries,
            args.modality,
            cache_dir=args.cache_dir,
            seed=args.seed,
            voice=args.voice,
        )
    except SynthesisError as e:
        print(f"supportqa-server eval: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    factory = client_factory or _default_client_factory(args)
    try:
        outcomes, wall_s = asyncio.run(_evaluate(args, entries, dataset, inputs, factory))
    except EvalRunError as e:
        print(f"supportqa-server eval: error: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED

    label = args.no_answer_label
    sweep: list[dict] = []
    threshold = args.min_score
    if args.sweep_thresholds:
        answered = [o.scores[0] for o in outcomes if o.scores]
        sweep = sweep_thresholds(outcomes, threshold_grid(answered, args.sweep_step), label)
        if threshold is None:
            threshold = best_threshold(sweep)
        if threshold is not None:
            outcomes = apply_threshold(outcomes, threshold)
    metrics = compute_metrics(outcomes, label)
    metrics["wall_s"] = round(wall_s, 3)
    metrics["modality"] = args.modality
    config = {
        "kb": str(args.kb),
        "queries": str(args.queries or args.kb),
        "kb_split": args.kb_split,
        "queries_split": args.queries_split,
        "dev_fraction": args.dev_fraction,
        "seed": args.seed,
        "no_answer_label": label,
        "limit": args.limit,
        "knowledge_base": args.knowledge_base,
        "entries": len(entries),
        "top_k": args.top_k,
        "min_score": args.min_score,
        "concurrency": args.concurrency,
        "target": args.target or "in-process",
    }
    if adapted is not None:
        config["adapt"] = {k: getattr(adapted, k) for k in
                           ("out_dir", "fingerprint", "steps", "seconds", "peak_rss_mb", "reused")}
    if args.sweep_thresholds:
        config["threshold_applied"] = threshold
        metrics["sweep"] = sweep
        metrics["best_threshold"] = best_threshold(sweep)
    metrics["config"] = config
    if faq or args.bm25:
        metrics["bm25"] = compute_metrics(
            bm25_outcomes(entries, dataset.queries, args.top_k), label)
        config["kb_shape"] = args.kb_shape if faq else "intents"

    print(
        f"{args.modality} evaluation: {len(outcomes)} queries, {len(entries)} entries "
        f"in knowledge base {args.knowledge_base!r}"
    )
    print(format_metrics(metrics))
    if "bm25" in metrics:
        b = metrics["bm25"]
        print(f"bm25 baseline (same entries and queries): accuracy@1 "
              f"{b['accuracy_at_1']:.4f}, recall@5 {b['recall_at_5']:.4f}, mrr {b['mrr']:.4f}; "
              f"server - bm25 accuracy@1 {metrics['accuracy_at_1'] - b['accuracy_at_1']:+.4f}")
    if args.sweep_thresholds:
        print()
        print("threshold sweep (asked with min_score=0; '<' marks the best no_answer_f1)")
        print(format_sweep(sweep, metrics["best_threshold"]))
        if threshold is not None:
            print(f"metrics above use threshold {threshold:g}")
    errors = Counter(o.error.split(":", 1)[0] for o in outcomes if o.error)
    if errors:
        first = next(o.error for o in outcomes if o.error)
        summary = ", ".join(f"{code} {n}" for code, n in errors.most_common())
        print(
            f"warning: {sum(errors.values())} queries failed ({summary}); first: {first}",
            file=sys.stderr,
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if outcomes and sum(errors.values()) == len(outcomes):
        print("supportqa-server eval: error: every query failed", file=sys.stderr)
        return EXIT_RUN_FAILED
    return EXIT_OK
