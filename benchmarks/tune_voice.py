"""Offline sweep of Whisper's knowledge-base language model: transcribe BANKING77 dev questions
spoken by espeak-ng in-process, then rank the transcripts as the server does (dense + BM25,
replayed by tune_rank). The numbers steer the choice; the reported ones come from
`supportqa-server eval --modality voice`.

Usage:
    python benchmarks/tune_voice.py --first 0 --last 800 --configs 4:0.3,4:0.4 [--beams 5]

A config is ORDER:WEIGHT; weight 0 is plain Whisper.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune_rank import BM25, ROOT, embed, evaluate, load, route_hits  # noqa: E402


def main() -> None:
    import torch
    from supportqa_server import synth
    from supportqa_server.audio import decode_audio
    from supportqa_server.biasing import KnowledgeLM
    from supportqa_server.encoder import TextEncoder
    from supportqa_server.settings import Settings
    from supportqa_server.transcribe import SpeechRecognizer

    p = argparse.ArgumentParser()
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--last", type=int, default=800)
    p.add_argument("--configs", default="4:0.3")
    p.add_argument("--beams", type=int, default=0)
    p.add_argument("--model", default="tiny.en")
    args = p.parse_args()
    torch.set_num_threads(2)
    entries, queries, _ = load("banking77")
    qs = queries[args.first : args.last]
    rows = [(e.id, kind, t) for e in entries for kind, t in e.texts()]
    cache = ROOT / ".cache" / "eval"  # the clips `eval --modality voice` caches
    clips = [decode_audio(synth.synthesize_speech(q.text, cache_dir=cache)) for q in qs]
    rv = embed([t for _, _, t in rows], "", "banking77-minilm-rows")
    enc, bm, opts = TextEncoder(""), BM25([t for _, _, t in rows]), Settings().rank_options()

    def accuracy(texts: list[str]) -> float:
        # As the server searches: 200 dense rows, 50 BM25 rows (pipeline.LEXICAL_ROWS).
        hits = route_hits(rows, enc.encode_sorted(texts) @ rv.T, texts, bm, 200, 50)
        prepared = [(q.label, d, x) for q, (d, x) in zip(qs, hits, strict=True)]
        return evaluate(prepared, None, opts, 200)["acc"]

    print(f"text accuracy@1 {accuracy([q.text for q in qs]):.4f} ({len(qs)} queries)")
    rec = SpeechRecognizer(args.model, beam_size=args.beams or None)
    for config in args.configs.split(","):
        order, weight = config.split(":")
        lm = KnowledgeLM(rec.token_classes(), [t for _, _, t in rows], order=int(order))
        rec.lm_weight = float(weight)
        t0 = time.perf_counter()
        heard = []
        for i in range(0, len(clips), 8):
            batch = clips[i : i + 8]
            heard += [t.text for t in rec.transcribe_batch(batch, lms=[lm] * len(batch))]
        ms = (time.perf_counter() - t0) * 1000 / len(clips)
        print(f"beams={args.beams} order={order} weight={weight}: accuracy@1 "
              f"{accuracy(heard):.4f}, {ms:.0f} ms a clip in batches of 8", flush=True)


if __name__ == "__main__":
    main()
