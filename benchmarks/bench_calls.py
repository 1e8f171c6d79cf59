"""Latency of a phone turn: whole-call Converse streams of G.711 mu-law at 8 kHz, sent in
20 ms frames at the line's own pace, each call three turns of about 3 s of speech and 1.5 s
of line silence. Measured per turn, from the end of the caller's speech (the last spoken
frame sent) to the turn's first Answer or NoAnswer event, at 1 and 8 concurrent calls. The
server ends a turn after SUPPORTQA_TURN_SILENCE_MS (700 ms) of non-speech, so that much of
each figure is waiting by design; the table gives it apart.

Usage: python benchmarks/bench_calls.py [--calls 1 8] [--out docs/benchmarks/calls.md]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_text import Server, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TURNS = [  # about 3 s each when spoken by espeak-ng
    "I have lost my card and I cannot find it anywhere in the house",
    "How do I close my account with you for good please",
    "My card has been stolen from my bag what should I do now",
]
FRAME = 160  # bytes of mu-law in 20 ms at 8 kHz
GAP_S = 1.5  # line silence after each turn


def mulaw_turns() -> list[tuple[bytes, bytes]]:
    """(speech, line silence) of each turn, mu-law at 8 kHz."""
    import soundfile as sf
    import soxr
    from supportqa_tools.synth import synthesize_speech

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop  # the gateway's encoder (Python 3.11-3.12)
    out = []
    for text in TURNS:
        samples, rate = sf.read(io.BytesIO(synthesize_speech(text)), dtype="float32")
        phone = soxr.resample(samples, rate, 8000)
        pcm = (np.clip(phone, -1, 1) * 32767).astype("<i2").tobytes()
        out.append((audioop.lin2ulaw(pcm, 2), b"\xff" * int(8000 * GAP_S)))
    return out


async def call(target: str, turns: list[tuple[bytes, bytes]]) -> tuple[list[float], str]:
    """One call; per turn, seconds from its last speech frame to its first answer event, and
    the error that ended the call early ("" if none)."""
    from supportqa.client import AsyncSupportClient, SupportQAError
    from supportqa.v1 import supportqa_pb2 as pb

    spoken_end: list[float] = []
    latencies: list[float] = []

    async def requests():
        yield pb.ConverseRequest(config=pb.ConverseConfig(
            question=pb.Question(), format=pb.AUDIO_FORMAT_MULAW, sample_rate_hz=8000,
            whole_call=True))
        t = time.perf_counter()
        for speech, silence in turns:
            for part in (speech, silence):
                for i in range(0, len(part), FRAME):
                    yield pb.ConverseRequest(audio_chunk=part[i : i + FRAME])
                    t += 0.020  # the line's pace: one 20 ms frame per 20 ms
                    await asyncio.sleep(max(0.0, t - time.perf_counter()))
                if part is speech:
                    spoken_end.append(time.perf_counter())

    async with AsyncSupportClient(target, timeout=600, retries=0) as c:
        answered = -1
        try:
            async for ev in c.converse(requests(), timeout=600):
                if isinstance(ev, pb.Done):
                    answered = ev.turn
                elif isinstance(ev, pb.Answer | pb.NoAnswer) and len(latencies) == answered + 1:
                    latencies.append(time.perf_counter() - spoken_end[len(latencies)])
        except SupportQAError as e:  # counted: a refused call is a result, not a crash
            return latencies, e.code.name
    return latencies, ""


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3, help="calls per caller at each point")
    ap.add_argument("--port", type=int, default=50393)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "calls.md"))
    args = ap.parse_args()
    from supportqa.client import SupportClient
    from supportqa.knowledge_file import read_entries

    turns = mulaw_turns()
    speech_s = [len(s) / 8000 for s, _ in turns]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), args.port, SUPPORTQA_SPEECH_MODEL="tiny.en")
        try:
            with SupportClient(server.target) as c:
                c.upsert(read_entries(ROOT / "knowledge" / "sample.jsonl"))
            server.settle()
            asyncio.run(call(server.target, turns[:1]))  # warm-up: models, VAD, LM
            for n in args.calls:
                lat: list[float] = []
                errors: dict[str, int] = {}
                for _ in range(args.rounds):
                    async def all_calls(n=n):
                        return await asyncio.gather(*(call(server.target, turns)
                                                      for _ in range(n)))
                    for got, error in asyncio.run(all_calls()):
                        lat += got
                        if error:
                            errors[error] = errors.get(error, 0) + 1
                rows.append((n, len(lat), statistics.median(lat) if lat else float("nan"),
                             percentile(lat, 99) if lat else float("nan"), errors))
                print(rows[-1], file=sys.stderr)
        finally:
            server.stop()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    lines = [
        "# Phone-turn latency (whole-call Converse)", "",
        f"`python benchmarks/bench_calls.py`, CPU: {cpu}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores; Whisper tiny.en, beam 5, "
        "the sample knowledge base.", "",
        f"Each call: {len(TURNS)} turns of {', '.join(f'{s:.1f}' for s in speech_s)} s of "
        f"espeak-ng speech, each followed by {GAP_S} s of line silence, as G.711 mu-law at "
        "8 kHz in 20 ms frames at the line's pace. Latency: from the last spoken frame sent "
        "to the turn's first Answer/NoAnswer event; it includes the 700 ms of non-speech "
        "that ends a turn (SUPPORTQA_TURN_SILENCE_MS).", "",
        "| concurrent calls | turns answered | p50 (s) | p99 (s) | p50 after the 0.7 s turn "
        "end (s) | calls ended by an error |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for n, count, p50, p99, errors in rows:
        lines.append(f"| {n} | {count} | {p50:.2f} | {p99:.2f} | {p50 - 0.7:.2f} | "
                     f"{errors or '-'} |")
    return write_report(args.out, lines + [""])


if __name__ == "__main__":
    sys.exit(main())
