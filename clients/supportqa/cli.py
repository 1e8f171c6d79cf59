"""`supportqa` command line: ask a question, ingest a knowledge base, show stats; feedback,
suggestions from the question log, lint."""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
from pathlib import Path

from .client import (
    AUDIO_FORMATS,
    DEFAULT_TARGET,
    TLS,
    SupportClient,
    SupportQAError,
    audio_format_of,
)
from .knowledge_file import (
    KnowledgeFileError,
    is_article_id,
    read_folder,
    read_numbered,
    repeated_ids,
)
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
        fmt = audio_format_of(args.audio)
        # Raw samples (PCM16, G.711) need their rate, which the CLI does not take: send
        # containers only.
        raw = {AUDIO_FORMATS[f] for f in ("pcm16", "mulaw", "alaw")}
        kwargs.update(audio=Path(args.audio).read_bytes(),
                      audio_format="" if AUDIO_FORMATS[fmt] in raw else fmt)
    if args.image:
        kwargs.update(image=Path(args.image).read_bytes(),
                      image_mime=mimetypes.guess_type(args.image)[0] or "")
    result = client.ask(args.question or "", **kwargs)
    if result.HasField("transcript"):
        print(f"heard: {result.transcript.text!r} ({result.transcript.language})")
    if result.HasField("image_text") and result.image_text.lines:
        print("read: " + " / ".join(line.text for line in result.image_text.lines))
    if result.HasField("not_heard"):
        print(f"not heard: {result.not_heard.reason}")
        return 0
    if result.HasField("no_answer"):
        print(result.no_answer.reason)  # "no confident answer: ..." from the server
        return 0
    if result.HasField("clarify"):
        print("did you mean: " + " or ".join(repr(o.title or o.entry_id)
                                              for o in result.clarify.options) + "?")
    for a in result.answers:
        routes = ",".join(ROUTE_NAMES.get(r, "?") for r in a.routes)
        print(f"{a.rank}. [{a.score:.3f}] {a.title}  ({a.entry_id}; {routes})")
        if a.HasField("passage"):
            where = " > ".join(a.passage.headings)
            print(f"   in: {where or '(lead)'}  [{a.passage.start}:{a.passage.end}]"
                  + (f"  {a.url}" if a.url else ""))
            if a.short_answer:
                print(f"   short: {a.short_answer}")
        print(f"   {a.answer}")
    t = result.timings
    print(f"({t.total_us / 1000:.1f} ms: embed {t.embed_us / 1000:.1f}, "
          f"search {t.search_us / 1000:.1f}; request {result.request_id})")
    return 0


def _ingest(args: argparse.Namespace, client: SupportClient) -> int:
    """All or nothing: the whole file is read and checked (by the server too, in a dry run)
    before the first entry is written; a bad line is reported as FILE:LINE and nothing is."""
    path = Path(args.path)
    if args.prune and not path.is_dir():
        print("error: --prune needs a folder of articles", file=sys.stderr)
        return 2
    try:
        if path.is_dir():  # ids are relative paths: unique, so no repeated-id check
            files = list(read_folder(path))
            numbered = list(enumerate((e for _, e in files), 1))
            where = [str(f) for f, _ in files]  # what a problem names
        else:
            numbered = list(read_numbered(path))  # (line in the file, entry)
            where = [f"{path}:{n}" for n, _ in numbered]
    except (OSError, UnicodeDecodeError, KnowledgeFileError) as e:
        print(f"error: {e}; nothing written", file=sys.stderr)
        return 2
    for _, e in numbered:
        if args.knowledge_base and not e.knowledge_base:
            e.knowledge_base = args.knowledge_base
    problems = ([] if path.is_dir() else
                repeated_ids(path, ((n, e.knowledge_base, e.id) for n, e in numbered)))
    checked = client.upsert((e for _, e in numbered), timeout=args.timeout, dry_run=True)
    problems += [f"{where[f.index]}: {f.message}" for f in checked.failures]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"error: {len(problems)} invalid line(s) in {path}; nothing written",
              file=sys.stderr)
        return 1
    done = 0

    def entries():
        nonlocal done
        for _, e in numbered:
            yield e
            done += 1
            _progress(done, len(numbered))

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
    if args.prune:
        kb = args.knowledge_base or "default"
        present = {e.id for _, e in numbered}
        gone = [i for i in client.list_ids(kb, timeout=args.timeout)
                if is_article_id(i) and i not in present]
        if gone:
            client.delete(gone, knowledge_base=kb, timeout=args.timeout)
        print(f"pruned {len(gone)} article(s) whose files are gone")
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


def _feedback(args: argparse.Namespace, client: SupportClient) -> int:
    r = client.feedback(args.request_id, args.helpful, entry_id=args.entry or "",
                        comment=args.comment or "", knowledge_base=args.knowledge_base)
    print(f"feedback stored: request {args.request_id} in {r.knowledge_base} ({r.outcome})")
    return 0


SUGGESTION_KINDS = {pb.SUGGESTION_KIND_PARAPHRASES: "paraphrases",
                    pb.SUGGESTION_KIND_NEW_ENTRY: "new entry"}


def _suggest(args: argparse.Namespace, client: SupportClient) -> int:
    found = client.suggest(args.knowledge_base, min_questions=args.min_questions)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps([MessageToDict(s) for s in found], indent=2, ensure_ascii=False))
        return 0
    if not found:
        print("no suggestions: no cluster of unanswered or not-helpful questions yet")
    for n, s in enumerate(found, 1):
        if s.kind == pb.SUGGESTION_KIND_PARAPHRASES:
            what = f"add {len(s.questions)} paraphrase(s) to {s.entry_id}"
        else:
            near = f"; nearest entry {s.nearest_entry_id}" if s.nearest_entry_id else ""
            what = f"new entry for {len(s.questions)} question(s){near}"
        print(f"{n}. {s.id}  {what}  [{s.score:.2f}, asked {s.asked}x]")
        print(f"   {s.reason}")
        for q in s.questions:
            print(f"   + {q}")
        if s.blocked:
            print(f"   ! {s.blocked}")
    return 0


def _accept(args: argparse.Namespace, client: SupportClient) -> int:
    found = {s.id: s for s in client.suggest(args.knowledge_base,
                                             min_questions=args.min_questions)}
    s = found.get(args.suggestion_id)
    if s is None:
        print(f"error: suggestion {args.suggestion_id} is not proposed now (new questions "
              "change a suggestion's id): run supportqa suggest again", file=sys.stderr)
        return 1
    try:
        summary = client.accept(s, knowledge_base=args.knowledge_base, title=args.title or "",
                                answer=args.answer or "", entry_id=args.id or "")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = (f"added to entry {s.entry_id}" if s.entry_id else
            f"wrote new entry {args.id or '(id from the title)'}")
    print(f"{what}: {len(s.questions)} question(s); {summary.written} entry written, "
          f"{summary.rows} rows")
    return 0


def _lint(args: argparse.Namespace, client: SupportClient) -> int:
    r = client.lint(args.knowledge_base)
    print(f"{r.entries} entries, {r.rows} rows: {len(r.confusable)} confusable pair(s), "
          f"{len(r.misplaced)} misplaced paraphrase(s)")
    for c in r.confusable:
        print(f"confusable: {c.entry_id_a} / {c.entry_id_b}  [centroids {c.similarity:.2f}; "
              f"closest {c.text_similarity:.2f}: {c.text_a!r} / {c.text_b!r}]")
    for m in r.misplaced:
        print(f"misplaced: {m.paraphrase!r} of {m.entry_id} [{m.own_score:.2f}] scores higher "
              f"for {m.other_entry_id} [{m.other_score:.2f}]")
    return 1 if args.strict and (r.confusable or r.misplaced) else 0


def _forget(args: argparse.Namespace, client: SupportClient) -> int:
    n = client.delete_questions(args.conversation, knowledge_base=args.knowledge_base)
    print(f"deleted {n} logged question(s) of conversation {args.conversation!r}")
    return 0


def _health(args: argparse.Namespace, client: SupportClient) -> int:
    from .client import wait_serving

    wait_serving(client._channel, args.wait)
    print("SERVING")
    return 0


# Options every command takes, before or after its name: `supportqa --target h:p ingest f` and
# `supportqa ingest f --target h:p` are the same. Their defaults are applied once, after parsing.
GLOBAL_DEFAULTS = {"target": DEFAULT_TARGET, "timeout": 60.0, "api_key": None, "tls": False,
                   "ca": None, "cert": None, "key": None, "server_name": ""}


def _global_options() -> argparse.ArgumentParser:
    """A parent parser of the global options, for the top level and each subcommand.

    Their defaults are SUPPRESS: a subcommand's parser then sets only the options given after
    it, and does not overwrite with its default one given before it.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=argparse.SUPPRESS,
                        help=f"server host:port (default {GLOBAL_DEFAULTS['target']})")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help=f"deadline per call, seconds (default {GLOBAL_DEFAULTS['timeout']:g})")
    common.add_argument("--api-key", default=argparse.SUPPRESS,
                        help="API key, if the server requires one")
    add_tls_options(common, default=argparse.SUPPRESS)
    return common


def add_tls_options(parser: argparse.ArgumentParser, default=None) -> None:
    """--tls, --ca, --cert, --key, --server-name: how to reach a TLS server."""
    parser.add_argument("--tls", action="store_true", default=default or False,
                        help="connect with TLS, trusting the system's CAs (or --ca)")
    parser.add_argument("--ca", default=default, metavar="PEM",
                        help="CA bundle that signed the server's certificate (implies --tls)")
    parser.add_argument("--cert", default=default, metavar="PEM",
                        help="client certificate, for servers that require one (mTLS)")
    parser.add_argument("--key", default=default, metavar="PEM", help="key of --cert")
    parser.add_argument("--server-name", default=default or "",
                        help="name to check the server's certificate against")


def tls_of(args: argparse.Namespace) -> TLS | None:
    """The TLS settings the options ask for; None for plaintext."""
    if not (args.tls or args.ca or args.cert):
        return None
    return TLS(args.ca, args.cert, args.key, args.server_name)


def build_parser() -> argparse.ArgumentParser:
    """The `supportqa` argument parser; parse with parse_args() to get the global defaults."""
    common = _global_options()
    parser = argparse.ArgumentParser(prog="supportqa", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", parents=[common],
                         help="ask a question and print the ranked answers")
    ask.add_argument("question", nargs="?", default="")
    ask.add_argument("--audio", help="audio file to ask with (wav, flac, ogg, mp3)")
    ask.add_argument("--image", help="image file to ask with (png, jpeg, webp, ...)")
    ask.add_argument("--knowledge-base", "-k", default="default")
    ask.add_argument("--top-k", type=int, default=5)
    ask.add_argument("--min-score", type=float, default=None)
    ask.add_argument("--tag", action="append", help="only entries with this tag (repeatable)")
    ask.add_argument("--locale", default="")
    ask.add_argument("--language", default="", help="spoken-language hint, e.g. en")
    ing = sub.add_parser("ingest", parents=[common],
                         help="stream a JSONL knowledge base, or a folder of Markdown / HTML / "
                         "text articles, into the server")
    ing.add_argument("path", help="a JSONL file, or a folder of .md/.html/.txt articles")
    ing.add_argument("--prune", action="store_true",
                     help="with a folder: delete the articles whose files are gone")
    ing.add_argument("--knowledge-base", "-k", default="",
                     help="knowledge base for entries that name none")
    st = sub.add_parser("stats", parents=[common],
                        help="entries and rows per knowledge base, loaded models")
    st.add_argument("--knowledge-base", "-k", default="")
    fb = sub.add_parser("feedback", parents=[common],
                        help="say whether an answer helped (its request id: the last line of "
                        "supportqa ask, AnswerSet.request_id)")
    fb.add_argument("request_id")
    said = fb.add_mutually_exclusive_group(required=True)
    said.add_argument("--helpful", dest="helpful", action="store_true", default=None)
    said.add_argument("--not-helpful", dest="helpful", action="store_false")
    fb.add_argument("--entry", help="the entry that was the right answer")
    fb.add_argument("--comment", help="free text (masked like the questions)")
    fb.add_argument("--knowledge-base", "-k", default="",
                    help="where it was asked (default: every one the key may use)")
    sg = sub.add_parser("suggest", parents=[common],
                        help="paraphrases and new entries proposed by the questions that got "
                        "no answer or a not-helpful feedback")
    sg.add_argument("--knowledge-base", "-k", default="default")
    sg.add_argument("--min-questions", type=int, default=0,
                    help="questions a cluster needs (default 2)")
    sg.add_argument("--json", action="store_true", help="print the suggestions as JSON")
    ac = sub.add_parser("accept", parents=[common],
                        help="apply a suggestion: add its paraphrases to the entry, or write "
                        "the new entry (with --title and --answer)")
    ac.add_argument("suggestion_id", help="the id supportqa suggest printed")
    ac.add_argument("--knowledge-base", "-k", default="default")
    ac.add_argument("--title", help="a new entry's title")
    ac.add_argument("--answer", help="a new entry's answer")
    ac.add_argument("--id", help="a new entry's id (default: made from the title)")
    ac.add_argument("--min-questions", type=int, default=0,
                    help="as given to supportqa suggest")
    li = sub.add_parser("lint", parents=[common],
                        help="entries too close to tell apart, paraphrases that score higher "
                        "for another entry")
    li.add_argument("--knowledge-base", "-k", default="default")
    li.add_argument("--strict", action="store_true", help="exit 1 when anything is found")
    fg = sub.add_parser("forget", parents=[common],
                        help="delete the logged questions of a conversation (privacy request)")
    fg.add_argument("--conversation", required=True,
                    help="the Question.metadata conversation_id they were asked with")
    fg.add_argument("--knowledge-base", "-k", default="", help="default: every one")
    hl = sub.add_parser("health", parents=[common],
                        help="exit 0 when the server reports SERVING (Docker check)")
    hl.add_argument("--wait", type=float, default=3.0, help="seconds to wait for SERVING")
    return parser


def parse_with_globals(parser: argparse.ArgumentParser, argv: list[str] | None,
                       defaults: dict) -> argparse.Namespace:
    """argv parsed by a parser whose global options (default argparse.SUPPRESS) are on the
    top level and on every subcommand; ``defaults`` fill those given nowhere. Also used by
    `supportqa-server`."""
    # A namespace holding the defaults: the top level and the subcommand overwrite only what
    # they were given (after the subcommand wins over before it).
    return parser.parse_args(argv, namespace=argparse.Namespace(**defaults))


def parse_args(argv: list[str] | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """argv parsed, global options before or after the subcommand; those not given defaulted."""
    return parse_with_globals(parser or build_parser(), argv, GLOBAL_DEFAULTS)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    if args.command == "ask" and not (args.question or args.audio or args.image):
        parser.error("ask needs a question, --audio or --image")
    handlers = {"ask": _ask, "ingest": _ingest, "stats": _stats, "health": _health,
                "feedback": _feedback, "suggest": _suggest, "accept": _accept, "lint": _lint,
                "forget": _forget}
    try:
        client = SupportClient(args.target, timeout=args.timeout, api_key=args.api_key,
                               tls=tls_of(args))
    except (OSError, ValueError) as e:
        parser.error(f"TLS: {e}")
    with client:
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
