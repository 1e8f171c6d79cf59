"""`supportqa-server` start-up: the OpenMP spin limit is set before torch loads, unless set."""

from __future__ import annotations

import os

from supportqa_server import cli


def test_serve_limits_openmp_spinning_unless_the_user_chose(monkeypatch, tmp_path):
    missing = str(tmp_path / "nope.jsonl")  # serve stops at the bad --ingest, loading nothing
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert cli.main(["serve", "--ingest", missing]) == 2
    assert os.environ["GOMP_SPINCOUNT"] == cli.OMP_SPIN_COUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    assert cli.main(["serve", "--ingest", missing]) == 2
    assert os.environ["GOMP_SPINCOUNT"] == "300000"
