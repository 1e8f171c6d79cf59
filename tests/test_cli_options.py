"""Global command-line options (`supportqa --target/--timeout/--api-key`, `supportqa-server
--log-level`) work before and after the subcommand, with the same defaults either way."""

from __future__ import annotations

import asyncio

import pytest
from supportqa import cli as client_cli
from supportqa_server import cli as server_cli

CLIENT_COMMANDS = [
    ["ask", "my card was stolen", "-k", "kb", "--top-k", "3"],
    ["ingest", "knowledge/sample.jsonl", "-k", "kb"],
    ["stats", "-k", "kb"],
    ["health", "--wait", "1"],
]
CLIENT_GLOBALS = ["--target", "example.org:6000", "--timeout", "7.5", "--api-key", "s3cret"]


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=lambda c: c[0])
def test_client_global_options_before_or_after_the_subcommand(command):
    before = client_cli.parse_args([*CLIENT_GLOBALS, *command])
    after = client_cli.parse_args([*command, *CLIENT_GLOBALS])
    split = client_cli.parse_args([*CLIENT_GLOBALS[:2], *command, *CLIENT_GLOBALS[2:]])
    assert vars(before) == vars(after) == vars(split)
    assert (after.target, after.timeout, after.api_key) == ("example.org:6000", 7.5, "s3cret")
    assert after.command == command[0]


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=lambda c: c[0])
def test_client_global_defaults_are_kept(command):
    args = client_cli.parse_args(command)
    assert args.target == client_cli.DEFAULT_TARGET == "localhost:50051"
    assert args.timeout == 60.0 and args.api_key is None
    # one option given on one side: the others keep their defaults, on either side
    for argv in (["--timeout", "5", *command], [*command, "--timeout", "5"]):
        args = client_cli.parse_args(argv)
        assert (args.target, args.timeout, args.api_key) == ("localhost:50051", 5.0, None)


def test_client_option_after_the_subcommand_wins_over_before():
    args = client_cli.parse_args(["--target", "a:1", "stats", "--target", "b:2"])
    assert args.target == "b:2"


def test_client_subcommand_help_lists_the_global_options(capsys):
    with pytest.raises(SystemExit) as e:
        client_cli.main(["ingest", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--target" in out and "--api-key" in out and "--timeout" in out


def test_client_bad_global_option_value_is_an_error_after_the_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        client_cli.parse_args(["stats", "--timeout", "soon"])
    assert e.value.code == 2
    assert "--timeout" in capsys.readouterr().err


SERVER_COMMANDS = [
    ["serve", "--port", "0"],
    ["eval", "--kb", "kb.csv"],
    ["adapt", "--kb", "kb.jsonl", "--out", "model"],
]


@pytest.mark.parametrize("command", SERVER_COMMANDS, ids=lambda c: c[0])
def test_server_log_level_before_or_after_the_subcommand(command):
    before = server_cli.parse_args(["--log-level", "debug", *command])
    after = server_cli.parse_args([*command, "--log-level", "debug"])
    assert vars(before) == vars(after)
    assert after.log_level == "debug" and after.command == command[0]
    assert server_cli.parse_args(command).log_level == "INFO"


def test_server_log_level_after_serve_is_applied(monkeypatch, tmp_path):
    """`supportqa-server serve ... --log-level debug` configures logging with DEBUG (serve
    stops at the missing --ingest file, loading nothing)."""
    import logging

    levels = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    missing = str(tmp_path / "nope.jsonl")
    assert server_cli.main(["serve", "--ingest", missing, "--log-level", "debug"]) == 2
    assert server_cli.main(["--log-level", "warning", "serve", "--ingest", missing]) == 2
    assert server_cli.main(["serve", "--ingest", missing]) == 2
    assert levels == ["DEBUG", "WARNING", "INFO"]


async def test_cli_ingest_and_stats_with_target_after_the_subcommand(text_server, tmp_path,
                                                                     capsys):
    """The reported failure: `supportqa ingest FILE --target HOST:PORT`, against a real server."""
    kb = tmp_path / "kb.jsonl"
    kb.write_text(
        '{"id": "a", "answer": "Yes.", "questions": ["do you open on sundays"]}\n'
        '{"id": "b", "answer": "No.", "questions": ["do you sell gift cards"]}\n'
    )
    # The blocking CLI runs in a thread: the server shares this test's event loop.
    argv = ["ingest", str(kb), "-k", "cli_opts_kb", "--target", text_server, "--timeout", "60"]
    assert await asyncio.to_thread(client_cli.main, argv) == 0
    assert "written 2" in capsys.readouterr().out
    argv = ["stats", "--target", text_server, "-k", "cli_opts_kb"]
    assert await asyncio.to_thread(client_cli.main, argv) == 0
    assert "cli_opts_kb: 2 entries" in capsys.readouterr().out
