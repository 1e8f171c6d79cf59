"""Offline sweep of Whisper's knowledge-base language model: transcribe BANKING77 dev questions
spoken by espeak-ng in-process, then rank the transcripts as the server does (dense + BM25,
replayed by tune_rank). The numbers steer the choice; the reported ones come from
`supportqa-server eval --modality voice`.

Usage:
    python benchmarks/tune_voice.py --first 0 --last 800 --configs 4:0.3,4:0.4 [--beams 5]
    python benchmarks/tune_voice.py --beams 5 --configs 4:0.3 --head-weights 0,0.5 --split 400

A config is ORDER:WEIGHT; weight 0 is plain Whisper. Transcripts are cached per clip range and
config (.cache/tune/voice-*.json). --head-weights ranks them with the entry head (head.py,
C=10) at each weight; --split N also scores queries before and from N apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune_rank import BM25, ROOT, embed, evaluate, load, route_hits  # noqa: E402


def main() -> None:
    import torch
    from supportqa_server.answering.rank import RankOptions
    from supportqa_server.runtime.encoder import TextEncoder
    from supportqa_server.runtime.settings import Settings
    from supportqa_server.speech.audio import decode_audio
    from supportqa_server.speech.biasing import KnowledgeLM
    from supportqa_server.speech.transcribe import SpeechRecognizer
    from supportqa_tools import synth

    p = argparse.ArgumentParser()
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--last", type=int, default=800)
    p.add_argument("--configs", default="4:0.3")
    p.add_argument("--beams", type=int, default=0)
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--head-weights", default="", help="comma-separated entry head weights")
    p.add_argument("--split", type=int, default=0, help="also score the halves apart")
    args = p.parse_args()
    torch.set_num_threads(2)
    entries, queries, _ = load("banking77")
    qs = queries[args.first : args.last]
    rows = [(e.id, kind, t) for e in entries for kind, t in e.texts()]
    cache = ROOT / ".cache" / "eval"  # the clips `eval --modality voice` caches
    clips = [decode_audio(synth.synthesize_speech(q.text, cache_dir=cache)) for q in qs]
    rv = embed([t for _, _, t in rows], "", "banking77-minilm-rows")
    enc, bm = TextEncoder(""), BM25([t for _, _, t in rows])
    opts = RankOptions.from_settings(Settings())

    head = None
    head_weights = [float(w) for w in args.head_weights.split(",") if w]
    if head_weights:
        from supportqa_server.answering.head import train_head

        head = train_head(rv, [e for e, _, _ in rows], c=10.0, texts=[t for _, _, t in rows])

    def accuracy(texts: list[str]) -> str:
        # As the server searches: 200 dense rows, 50 BM25 rows (pipeline.LEXICAL_ROWS).
        qv = enc.encode_sorted(texts)
        hits = route_hits(rows, qv @ rv.T, texts, bm, 200, 50)
        probs = head.probabilities(qv, texts) if head is not None else [None] * len(texts)
        out = []
        for w in head_weights or [opts.head_weight]:
            o = dataclasses.replace(opts, head_weight=w)
            parts = [(0, len(qs))]
            if args.split:
                parts += [(0, args.split), (args.split, len(qs))]
            accs = []
            for a, b in parts:
                prepared = [(q.label, d, x, p) for q, (d, x), p in
                            zip(qs[a:b], hits[a:b], probs[a:b], strict=True)]
                accs.append(f"{evaluate(prepared, None, o, 200)['acc']:.4f}")
            out.append(f"head {w}: " + " / ".join(accs))
        return "; ".join(out)

    print(f"text accuracy@1 {accuracy([q.text for q in qs])} ({len(qs)} queries)")
    rec = None
    for config in args.configs.split(","):
        order, weight = config.split(":")
        path = ROOT / ".cache" / "tune" / (
            f"voice-{args.model}-b{args.beams}-{order}-{weight}-{args.first}-{args.last}.json")
        t0 = time.perf_counter()
        if path.exists():
            heard = json.loads(path.read_text())
        else:
            rec = rec or SpeechRecognizer(args.model, beam_size=args.beams or None)
            lm = KnowledgeLM(rec.token_classes(), [t for _, _, t in rows], order=int(order))
            rec.lm_weight = float(weight)
            heard = []
            for i in range(0, len(clips), 8):
                batch = clips[i : i + 8]
                heard += [t.text for t in rec.transcribe_batch(batch, lms=[lm] * len(batch))]
            path.write_text(json.dumps(heard))
        ms = (time.perf_counter() - t0) * 1000 / len(clips)
        print(f"beams={args.beams} order={order} weight={weight}: accuracy@1 "
              f"{accuracy(heard)}, {ms:.0f} ms a clip in batches of 8", flush=True)


if __name__ == "__main__":
    main()
