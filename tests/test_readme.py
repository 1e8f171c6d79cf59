"""The README's client commands and its Python example, run as written against a real server
with voice and OCR on: a README a user copies from must work."""

from __future__ import annotations

import asyncio
import io
import re
import shlex

import pytest
from conftest import ROOT
from PIL import Image

pytestmark = pytest.mark.slow
README = (ROOT / "README.md").read_text()
README_TARGET = "localhost:50051"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _client_commands() -> list[list[str]]:
    """Every `.venv/bin/supportqa ...` line of the README's shell blocks, as argv (comments
    dropped, continuation lines joined)."""
    out = []
    for block in _blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith(".venv/bin/supportqa "):
                out.append(shlex.split(line, comments=True)[1:])
    return out


def test_the_readme_lists_client_commands():
    verbs = [argv[0] for argv in _client_commands()]
    assert {"ask", "ingest", "stats", "health"} <= set(verbs)


@pytest.fixture(scope="module")
async def readme_server(tmp_path_factory):
    from supportqa_server.api.server import running_server
    from supportqa_server.runtime.settings import Settings

    settings = Settings(port=0, data_dir=tmp_path_factory.mktemp("data"), speech_model="tiny.en",
                        ocr=True, clip_model="")
    async with running_server(settings) as target:
        yield target


async def test_every_readme_client_command_runs(readme_server, tmp_path, monkeypatch, capsys):
    from supportqa.cli import main
    from supportqa_tools.synth import render_screenshot, synthesize_speech

    monkeypatch.chdir(tmp_path)  # the files the README names, made here
    (tmp_path / "knowledge").mkdir()
    (tmp_path / "knowledge" / "sample.jsonl").write_bytes(
        (ROOT / "knowledge" / "sample.jsonl").read_bytes())
    (tmp_path / "help-centre").mkdir()
    (tmp_path / "help-centre" / "returns.md").write_text(
        "# Returns\n\n## Sending an order back\n\nPack it and print the label from your "
        "account; returns are free within 30 days.\n")
    (tmp_path / "question.wav").write_bytes(synthesize_speech("someone stole my card"))
    Image.open(io.BytesIO(render_screenshot("Error 402: your card was declined", seed=1))).save(
        tmp_path / "screenshot.png")
    commands = sorted(_client_commands(), key=lambda argv: argv[0] != "ingest")  # data first
    for argv in commands:
        argv = [readme_server if a == README_TARGET else a for a in argv]
        if "--target" not in argv:
            argv = ["--target", readme_server, *argv]
        assert await asyncio.to_thread(main, argv) == 0, argv
        out = capsys.readouterr().out
        if argv[2:3] == ["ask"] or argv[:1] == ["ask"]:
            assert re.search(r"^1\. \[", out, re.M), (argv, out)  # a ranked answer


async def test_the_readme_python_example_runs(readme_server, capsys):
    (example,) = _blocks("python")
    code = example.replace(README_TARGET, readme_server)
    await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Accepted" in out and "Done" in out
