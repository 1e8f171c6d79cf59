"""Tests of the load generator's pure parts: percentiles, report, question mixing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from supportqa.bench import Sample, format_report, load_questions, percentile, summarize
from supportqa.v1 import supportqa_pb2


def test_percentile_nearest_rank():
    values = [15, 20, 35, 40, 50]
    # Ranks ceil(q / 100 * 5): p30 -> 2, p40 -> 2, p50 -> 3, p100 -> 5; p0 -> rank 1.
    assert percentile(values, 30) == 20
    assert percentile(values, 40) == 20
    assert percentile(values, 50) == 35
    assert percentile(values, 100) == 50
    assert percentile(values, 0) == 15
    assert percentile(list(reversed(values)), 50) == 35
    assert percentile([7.5], 99) == 7.5


def test_percentile_of_1_to_100():
    values = list(range(100, 0, -1))
    assert [percentile(values, q) for q in (50, 90, 99, 99.5)] == [50, 90, 99, 100]


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1], 101)


def stream_samples():
    # Ten successful streams with latency 10..100 ms, first event at 1..10 ms, first answer at
    # 5..50 ms, and two failures.
    ok = [Sample("OK", i / 100, i / 1000, i / 200) for i in range(1, 11)]
    return ok + [
        Sample("UNAVAILABLE", 0.001, None, None),
        Sample("DEADLINE_EXCEEDED", 1.0, None, None),
    ]


def test_summarize_stream():
    report = summarize(stream_samples(), 2.0, mode="stream", concurrency=4, target="h:1")
    assert report["requests"] == 12
    assert report["ok"] == 10
    assert report["rps"] == 6.0
    # Failures are left out of the latencies: p50 of 10..100 ms is rank 5 -> 50 ms.
    assert report["latency_ms"] == {"p50": 50.0, "p90": 90.0, "p99": 100.0, "max": 100.0}
    assert report["ttfe_ms"] == {"p50": 5.0, "p99": 10.0}
    assert report["ttfa_ms"] == {"p50": 25.0, "p99": 50.0}
    assert report["errors"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    assert report["mode"] == "stream"
    assert report["concurrency"] == 4
    assert report["duration_s"] == 2.0
    json.dumps(report)


def test_summarize_unary_without_successes():
    report = summarize(
        [Sample("UNAUTHENTICATED", 0.002, None, None)], 1.0, mode="unary", concurrency=1
    )
    assert report["latency_ms"] == {"p50": None, "p90": None, "p99": None, "max": None}
    assert "ttfe_ms" not in report
    assert "-" in format_report(report)


def test_format_report_table():
    report = summarize(stream_samples(), 2.0, mode="stream", concurrency=4, channels=2, warmup=3)
    text = format_report(report)
    lines = text.splitlines()
    assert "concurrency  4 (2 channels)" in lines
    assert "requests     12 (10 ok, 2 errors; warmup 3 not counted)" in lines
    assert "rps          6.0" in lines
    latency = next(line for line in lines if line.startswith("latency"))
    assert latency.split() == ["latency", "50.0", "90.0", "100.0", "100.0"]
    assert next(line for line in lines if line.startswith("first event")).split()[2:] == [
        "5.0",
        "10.0",
    ]
    assert any(line.split() == ["UNAVAILABLE", "1"] for line in lines)


def test_load_questions_mixes_modalities_round_robin(tmp_path):
    text = tmp_path / "q.txt"
    text.write_text("where is my card\n\nrefund please\nexchange rate\n", encoding="utf-8")
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"RIFF")
    pcm = tmp_path / "b.pcm"
    pcm.write_bytes(b"\0\0")
    png = tmp_path / "c.png"
    png.write_bytes(b"\x89PNG")
    questions = load_questions(
        text_file=text, audio_files=[wav, pcm], image_files=[png], knowledge_base="kb", top_k=3
    )
    kinds = ["text" if q.text else "audio" if q.HasField("audio") else "image" for q in questions]
    assert kinds[:6] == ["text", "audio", "image", "text", "audio", "image"]
    assert len(questions) == 9  # 3 modalities x the longest pool (3 texts)
    assert [q.text for q in questions if q.text] == [
        "where is my card",
        "refund please",
        "exchange rate",
    ]
    assert questions[1].audio.format == supportqa_pb2.AUDIO_FORMAT_WAV
    assert questions[4].audio.format == supportqa_pb2.AUDIO_FORMAT_PCM16
    assert questions[4].audio.sample_rate_hz == 16000
    assert questions[2].image.mime_type == "image/png"
    assert all(q.knowledge_base == "kb" and q.top_k == 3 for q in questions)


def test_load_questions_needs_some_input(tmp_path):
    with pytest.raises(ValueError, match="--text"):
        load_questions()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no questions"):
        load_questions(text_file=empty)


def test_bench_imports_neither_numpy_nor_torch():
    code = (
        "import sys, supportqa.bench; "
        "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
