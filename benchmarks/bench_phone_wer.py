"""Word error rate on real 8 kHz telephone speech: the server's speech path against plain
openai-whisper, same model weights, same clips, same run.

The clips are Asterisk's English prompts (apt `asterisk-core-sounds-en-wav`, one speaker,
8 kHz PCM16) with their transcripts (`core-sounds-en.txt.gz` of `asterisk-core-sounds-en`);
prompts of 3+ words, a seeded sample. Each is resampled to 16 kHz and transcribed by:
- plain: `whisper.transcribe(model)`, openai-whisper's own decoding (greedy with its
  temperature fallback);
- ours: `SpeechRecognizer.transcribe_batch` as the server runs it (trimmed encoder, beam 5),
  without and with the sample knowledge base's language model (SUPPORTQA_SPEECH_LM_WEIGHT).
The prompts are not about the sample knowledge base (banking), so the language model's row
shows what the bias costs on talk that is not about the knowledge base's words. WER is corpus
WER after whisper's English normaliser.

Usage: python benchmarks/bench_phone_wer.py [--clips 40] [--lm-weights 0,0.3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOUNDS = Path("/usr/share/asterisk/sounds/en")
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")


def prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """(wav path, transcript) of n prompts of 3+ words, a seeded sample."""
    refs = {}
    with gzip.open(TRANSCRIPTS, "rt") as f:
        for line in f:
            if ":" in line and not line.startswith(";"):
                name, text = (s.strip() for s in line.split(":", 1))
                wav = SOUNDS / f"{name}.wav"
                if text and not text.startswith("[") and len(text.split()) >= 3 and wav.exists():
                    refs[str(wav)] = text
    keys = sorted(refs)
    random.Random(seed).shuffle(keys)
    return [(k, refs[k]) for k in keys[:n]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm-weights", default="0,0.3")
    ap.add_argument("--model", default="tiny.en")
    args = ap.parse_args()
    if not TRANSCRIPTS.exists():
        sys.exit("apt install asterisk-core-sounds-en-wav asterisk-core-sounds-en first")
    import numpy as np
    import soundfile as sf
    import soxr
    import whisper
    from supportqa_server.runtime.settings import Settings
    from supportqa_server.speech.transcribe import SpeechRecognizer

    sys.path.insert(0, str(ROOT / "tests"))
    from test_transcribe import word_error_rate

    chosen = prompts(args.clips, args.seed)
    clips = []
    for path, _ in chosen:
        audio, rate = sf.read(path, dtype="float32")
        clips.append(soxr.resample(audio, rate, 16000).astype(np.float32))
    refs = [t for _, t in chosen]
    rec = SpeechRecognizer(args.model, "cpu", cache_dir=Settings().cache_dir, beam_size=5)
    kb = [json.loads(line) for line in (ROOT / "knowledge" / "sample.jsonl").open()]
    lm = rec.knowledge_lm([t for e in kb for t in (e.get("title", ""), e.get("answer", ""),
                                                    *e.get("questions", ())) if t])
    rows = []
    t0 = time.perf_counter()
    plain = [whisper.transcribe(rec.model, c, language="en", fp16=False)["text"] for c in clips]
    rows.append(("plain whisper.transcribe()", word_error_rate(refs, plain),
                 time.perf_counter() - t0))
    for w in (float(x) for x in args.lm_weights.split(",")):
        rec.lm_weight = w
        t0 = time.perf_counter()
        ours = [rec.transcribe_batch([c], lms=[lm] if w else None)[0].text for c in clips]
        rows.append((f"server path, LM weight {w}", word_error_rate(refs, ours),
                     time.perf_counter() - t0))
    base = rows[0][1]
    print(f"{len(clips)} Asterisk prompts, {args.model}, {platform.processor() or 'cpu'}")
    print("| decoding | WER | vs plain | s |\n|---|---:|---:|---:|")
    for name, wer, secs in rows:
        print(f"| {name} | {wer:.4f} | {wer / base:.2f}x | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
