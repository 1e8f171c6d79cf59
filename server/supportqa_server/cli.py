"""`supportqa-server`: serve the gRPC API, or evaluate retrieval quality through it."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from supportqa_server.runtime.logs import configure_logging


def _serve(args: argparse.Namespace) -> int:
    from supportqa_server.api.server import serve
    from supportqa_server.runtime.settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                   ("data_dir", args.data_dir)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValueError as e:
        print(f"error: bad settings: {e}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, settings.log_format)
    for p in args.ingest:
        if not Path(p).is_file():
            print(f"error: --ingest {p}: no such file", file=sys.stderr)
            return 2
    asyncio.run(serve(settings, [Path(p) for p in args.ingest]))
    return 0


# torch's OpenMP runtime (libgomp) keeps a worker spinning for 300,000 iterations after each
# parallel region. On 2 cores that spin takes the CPU that the Milvus search right after an
# encode needs: a lone question's search took 5.6-5.9 ms, 4.5-4.7 ms with 20,000 (one
# sentence's encode alone: the same within noise; docs/benchmarks/text.md). libgomp reads it when
# torch loads, hence here, before anything imports torch.
OMP_SPIN_COUNT = "20000"
# numpy's OpenBLAS runs a product of a few rows (the entry head's 16 questions x 384 x 77) on a
# pool of its own threads. Beside torch's OpenMP team on 2 cores that made every encode slower:
# 174 against 244 QPS at concurrency 32 (docs/benchmarks/tuning.md). torch does the heavy math;
# OpenBLAS reads this when numpy loads, hence here too.
NUMPY_BLAS_THREADS = "1"


# Options every command takes, before or after its name (`supportqa-server --log-level debug
# serve` or `supportqa-server serve --log-level debug`); their defaults are applied once.
GLOBAL_DEFAULTS = {"log_level": "INFO"}


def _global_options() -> argparse.ArgumentParser:
    """A parent parser of the global options, for the top level and each subcommand.

    Their defaults are SUPPRESS: a subcommand's parser then sets only the options given after
    it, and does not overwrite with its default one given before it.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        help=f"logging level (default {GLOBAL_DEFAULTS['log_level']})")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The `supportqa-server` argument parser; parse with parse_args() for the global defaults."""
    common = _global_options()
    parser = argparse.ArgumentParser(prog="supportqa-server", description=__doc__,
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common],
                           help="run the gRPC server (settings: SUPPORTQA_* env vars)")
    serve.add_argument("--host", default=None, help="bind address (SUPPORTQA_HOST)")
    serve.add_argument("--port", type=int, default=None, help="port, 0 = any (SUPPORTQA_PORT)")
    serve.add_argument("--data-dir", default=None, help="Milvus Lite dir (SUPPORTQA_DATA_DIR)")
    serve.add_argument("--ingest", action="append", default=[], metavar="PATH",
                       help="JSONL knowledge base to load at start-up (repeatable)")
    try:
        from supportqa_tools.evaluation import add_eval_arguments
    except ImportError:
        pass
    else:
        add_eval_arguments(sub.add_parser("eval", parents=[common],
                                          help="score retrieval through the gRPC API"))
    from supportqa_tools.adapt import add_adapt_arguments

    add_adapt_arguments(sub.add_parser(
        "adapt", parents=[common],
        help="fine-tune the text encoder on a knowledge base's paraphrases (offline)"))
    return parser


def parse_args(argv: list[str] | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """argv parsed, global options before or after the subcommand; those not given defaulted."""
    from supportqa.cli import parse_with_globals

    return parse_with_globals(parser or build_parser(), argv, GLOBAL_DEFAULTS)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GOMP_SPINCOUNT", OMP_SPIN_COUNT)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", NUMPY_BLAS_THREADS)
    args = parse_args(argv)
    if args.command == "serve":
        return _serve(args)  # logging as its settings say
    configure_logging(args.log_level)
    if args.command == "adapt":
        from supportqa_tools.adapt import adapt_main

        return adapt_main(args)
    from supportqa_tools.evaluation import eval_main

    return eval_main(args)


if __name__ == "__main__":
    sys.exit(main())
