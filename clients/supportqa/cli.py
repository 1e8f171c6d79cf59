"""`supportqa` command line: ask a question, ingest a knowledge base, show stats."""

from __future__ import annotations

import argparse
import mimetypes
import os
import sys
from pathlib import Path

from .client import DEFAULT_TARGET, SupportClient, SupportQAError
from .knowledge_file import KnowledgeFileError, read_entries
from .v1 import supportqa_pb2 as pb

ROUTE_NAMES = {pb.ROUTE_DENSE: "dense", pb.ROUTE_LEXICAL: "lexical", pb.ROUTE_READ: "read",
               pb.ROUTE_SEE: "see"}


def _progress(done: int, total: int, width: int = 30) -> None:
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} entries")
    sys.stderr.flush()


def _ask(args: argparse.Namespace, client: SupportClient) -> int:
    kwargs: dict = dict(knowledge_base=args.knowledge_base, top_k=args.top_k,
                        min_score=args.min_score, tags=args.tag or (), locale=args.locale,
                        language=args.language)
    if args.audio:
        kwargs.update(audio=Path(args.audio).read_bytes(),
                      audio_format=Path(args.audio).suffix.lstrip(".").lower())
        if kwargs["audio_format"] not in ("wav", "flac", "ogg", "opus", "mp3"):
            kwargs["audio_format"] = ""
    if args.image:
        kwargs.update(image=Path(args.image).read_bytes(),
                      image_mime=mimetypes.guess_type(args.image)[0] or "")
    result = client.ask(args.question or "", **kwargs)
    if result.HasField("transcript"):
        print(f"heard: {result.transcript.text!r} ({result.transcript.language})")
    if result.HasField("image_text") and result.image_text.lines:
        print("read: " + " / ".join(line.text for line in result.image_text.lines))
    if result.HasField("no_answer"):
        print(result.no_answer.reason)  # "no confident answer: ..." from the server
        return 0
    for a in result.answers:
        routes = ",".join(ROUTE_NAMES.get(r, "?") for r in a.routes)
        print(f"{a.rank}. [{a.score:.3f}] {a.title}  ({a.entry_id}; {routes})")
        print(f"   {a.answer}")
    t = result.timings
    print(f"({t.total_us / 1000:.1f} ms: embed {t.embed_us / 1000:.1f}, "
          f"search {t.search_us / 1000:.1f})")
    return 0


def _ingest(args: argparse.Namespace, client: SupportClient) -> int:
    path = Path(args.path)
    try:
        total = sum(1 for _ in read_entries(path))
    except (OSError, KnowledgeFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = 0

    def entries():
        nonlocal done
        for e in read_entries(path):
            if args.knowledge_base and not e.knowledge_base:
                e.knowledge_base = args.knowledge_base
            yield e
            done += 1
            _progress(done, total)

    try:
        s = client.upsert(entries(), timeout=args.timeout)
    except SupportQAError as e:
        sys.stderr.write("\n")
        if e.summary is not None:
            print(f"written before the error: {e.summary.written} entries", file=sys.stderr)
        raise
    sys.stderr.write("\n")
    print(f"received {s.received}, written {s.written} ({s.replaced} replaced), rows {s.rows}, "
          f"failed {len(s.failures)}")
    return 0


def _stats(args: argparse.Namespace, client: SupportClient) -> int:
    s = client.stats(args.knowledge_base or "")
    for kb in s.knowledge_bases:
        print(f"{kb.name}: {kb.entries} entries, {kb.rows} rows, {kb.image_rows} image rows, "
              f"threshold {kb.threshold:.2f}, entry head {kb.head or 'unknown'}")
    for c in s.components:
        state = "on" if c.enabled else "off"
        print(f"  {c.name}: {state} {c.model} {c.device} {c.detail}".rstrip())
    return 0


def _health(args: argparse.Namespace, client: SupportClient) -> int:
    from .client import wait_serving

    wait_serving(client._channel, args.wait)
    print("SERVING")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="supportqa", description=__doc__)
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server host:port")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per call, seconds")
    parser.add_argument("--api-key", default=None, help="API key, if the server requires one")
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="ask a question and print the ranked answers")
    ask.add_argument("question", nargs="?", default="")
    ask.add_argument("--audio", help="audio file to ask with (wav, flac, ogg, mp3)")
    ask.add_argument("--image", help="image file to ask with (png, jpeg, webp, ...)")
    ask.add_argument("--knowledge-base", "-k", default="default")
    ask.add_argument("--top-k", type=int, default=5)
    ask.add_argument("--min-score", type=float, default=None)
    ask.add_argument("--tag", action="append", help="only entries with this tag (repeatable)")
    ask.add_argument("--locale", default="")
    ask.add_argument("--language", default="", help="spoken-language hint, e.g. en")
    ing = sub.add_parser("ingest", help="stream a JSONL knowledge base into the server")
    ing.add_argument("path")
    ing.add_argument("--knowledge-base", "-k", default="",
                     help="knowledge base for entries that name none")
    st = sub.add_parser("stats", help="entries and rows per knowledge base, loaded models")
    st.add_argument("--knowledge-base", "-k", default="")
    hl = sub.add_parser("health", help="exit 0 when the server reports SERVING (Docker check)")
    hl.add_argument("--wait", type=float, default=3.0, help="seconds to wait for SERVING")
    args = parser.parse_args(argv)
    if args.command == "ask" and not (args.question or args.audio or args.image):
        parser.error("ask needs a question, --audio or --image")
    handlers = {"ask": _ask, "ingest": _ingest, "stats": _stats, "health": _health}
    with SupportClient(args.target, timeout=args.timeout, api_key=args.api_key) as client:
        try:
            return handlers[args.command](args, client)
        except SupportQAError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            # The reader left (`supportqa ask ... | head -1`): no traceback. stdout goes to
            # devnull so the interpreter's final flush does not raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1


if __name__ == "__main__":
    sys.exit(main())
