"""Voice through the server: clips/s and p50 at concurrency 1 and 8, batched vs serial; and
server memory with text, voice and image models loaded.

A batched and a serial server run side by side and are measured in turn, ``--repeats``
times, so drift on this shared machine falls on both alike; the table gives medians and the
ratio's median and range over the repeats.

Usage: python benchmarks/bench_server_voice.py [--out docs/benchmarks/server_voice.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_text import Server, rss_mb, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "I have lost my card and I can't find it anywhere",
    "How do I close my account for good",
    "My card has been stolen, what should I do",
    "How long does a transfer take to arrive",
    "Can I freeze my card for a while",
    "How do I change my passcode",
    "Where can I see my account statements",
    "How do I set up a direct debit",
]


async def load(target: str, clips: list[bytes], concurrency: int, requests: int) -> dict:
    from supportqa.bench import run_load
    from supportqa.client import question

    qs = [question(audio=c, audio_format="wav", knowledge_base="default") for c in clips]
    return await run_load(target, questions=qs, concurrency=concurrency, requests=requests,
                          warmup=concurrency, timeout=120.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_server_voice.md"))
    ap.add_argument("--port", type=int, default=50392)
    ap.add_argument("--rounds", type=int, default=6, help="requests per caller per point")
    ap.add_argument("--repeats", type=int, default=5, help="turns of every point")
    args = ap.parse_args()
    from supportqa.client import SupportClient
    from supportqa.knowledge_file import read_entries
    from supportqa_tools.synth import synthesize_speech

    clips = [synthesize_speech(q) for q in QUESTIONS]
    lines = [
        "# Voice through the server, and memory",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}. Clips: {len(clips)} "
        "espeak-ng questions (2-4 s each), Whisper tiny.en with the server's default decoding "
        "(5 beams, the KB's language model at 0.3), WAV over gRPC; load generator in a separate "
        f"process. A batched and a serial server run side by side; each point is measured "
        f"{args.repeats} times in turn ({args.rounds} requests per caller each time), medians "
        "shown.",
        "",
        "| speech_max_batch | concurrency | clips/s | p50 (ms) | p99 (ms) | errors |",
        "|---|---|---|---|---|---|",
    ]
    runs: dict[tuple[int, int], list[dict]] = {}
    memory: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        servers: dict[int, Server] = {}
        for i, batch in enumerate((8, 1)):
            data = Path(tmp) / str(batch)  # one Milvus Lite directory per server
            if not servers:
                srv = Server(data, args.port, SUPPORTQA_SPEECH_MODEL="")
                memory.append(("text encoder + store (empty KB)", rss_mb(srv.proc.pid)))
                srv.stop()
            servers[batch] = Server(data, args.port + i, SUPPORTQA_SPEECH_MODEL="tiny.en",
                                    SUPPORTQA_SPEECH_MAX_BATCH=str(batch))
            with SupportClient(servers[batch].target, timeout=300) as c:
                c.upsert(read_entries(ROOT / "knowledge" / "sample.jsonl"))
            servers[batch].settle()
        for _ in range(args.repeats):
            for conc in (1, 8):
                for batch, srv in servers.items():
                    r = asyncio.run(load(srv.target, clips, conc, conc * args.rounds))
                    runs.setdefault((batch, conc), []).append(r)
                    print(batch, conc, r["rps"], r["latency_ms"], r["errors"], flush=True)
        memory.append(("+ Whisper tiny.en, after the voice runs", rss_mb(servers[8].proc.pid)))
        for srv in servers.values():
            srv.stop()
        data = Path(tmp) / "8"
        srv = Server(data, args.port, SUPPORTQA_SPEECH_MODEL="tiny.en", SUPPORTQA_OCR="true")
        memory.append(("text + Whisper tiny.en + OCR (rapidocr) loaded", rss_mb(srv.proc.pid)))
        srv.stop()
        srv = Server(data, args.port, SUPPORTQA_SPEECH_MODEL="base", SUPPORTQA_OCR="true")
        memory.append(("text + Whisper base + OCR loaded", rss_mb(srv.proc.pid)))
        srv.stop()

    def med(batch: int, conc: int, *keys: str) -> float:
        vals = []
        for r in runs[(batch, conc)]:
            for k in keys:
                r = r[k]
            vals.append(r)
        return statistics.median(vals)

    for batch in (8, 1):
        for conc in (1, 8):
            errors: dict[str, int] = {}
            for r in runs[(batch, conc)]:
                for k, n in r["errors"].items():
                    errors[k] = errors.get(k, 0) + n
            lines.append(
                f"| {batch} | {conc} | {med(batch, conc, 'rps'):.2f} | "
                f"{med(batch, conc, 'latency_ms', 'p50'):.0f} | "
                f"{med(batch, conc, 'latency_ms', 'p99'):.0f} | {errors or '-'} |"
            )
    ratios = sorted(b["rps"] / s["rps"] for b, s in zip(runs[(8, 8)], runs[(1, 8)], strict=True))
    lines += [
        "",
        f"Concurrency 8, batched (max 8 clips per Whisper call) vs serial (max 1): "
        f"{med(8, 8, 'rps'):.2f} vs {med(1, 8, 'rps'):.2f} clips/s; per turn the ratio's median "
        f"is **{statistics.median(ratios):.2f}x** (range {ratios[0]:.2f}-{ratios[-1]:.2f}). "
        f"Against one caller at a time on the serial server ({med(1, 1, 'rps'):.2f} clips/s): "
        f"**{med(8, 8, 'rps') / med(1, 1, 'rps'):.2f}x**.",
        "",
        "## Server memory (RSS)",
        "",
        "| loaded | RSS (MB) |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in memory],
        "",
        "CLIP is not counted: no CLIP weights can be fetched here; openai/clip-vit-base-patch32 "
        "adds about 600 MB in fp32 (151 M parameters x 4 bytes).",
        "",
    ]
    return write_report(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
