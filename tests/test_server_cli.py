"""`supportqa-server` start-up: the OpenMP spin limit and numpy's BLAS threads are set before
torch and numpy load, unless set."""

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


def test_serve_keeps_numpy_blas_on_one_thread_unless_the_user_chose(monkeypatch, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert cli.main(["serve", "--ingest", missing]) == 2
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    assert cli.main(["serve", "--ingest", missing]) == 2
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4"
