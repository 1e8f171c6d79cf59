"""The committed generated code matches what the pinned codegen makes from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_has_no_drift(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "codegen produced nothing"
    for rel in fresh:
        committed = ROOT / "clients" / rel
        assert committed.exists(), f"{rel} is generated but not committed: run `make gen-proto`"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} differs from protos/: run `make gen-proto` and commit"
        )


def test_client_package_imports_no_server_dependency():
    import subprocess
    import sys

    code = (
        "import sys, supportqa, supportqa.cli, supportqa.bench\n"
        "bad = [m for m in ('torch', 'transformers', 'whisper', 'pymilvus', 'numpy',"
        " 'supportqa_server') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
