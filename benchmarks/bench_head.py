"""How long the entry head's training holds the model thread: per step and in all.

Trains the head (head.py) on a data set's knowledge-base rows, as the server does after a
write, with the shipped step budget and with a budget of 1e6 s (the whole fit in one step).
An encoder batch that arrives during training waits for at most one step. Uses the text vectors that
tune_rank.py cached (run it once for the data set and model first).

Usage: python benchmarks/bench_head.py [--data banking77|clinc150] [--model NAME_OR_DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune_rank import embed, load  # noqa: E402


def main() -> int:
    from supportqa_server.answering.head import HeadTrainer

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="banking77", choices=["banking77", "clinc150"])
    ap.add_argument("--model", default="", help="text model ('' the bundled MiniLM)")
    ap.add_argument("--c", type=float, default=10.0)
    ap.add_argument("--no-words", action="store_true", help="vectors only (before session 8)")
    args = ap.parse_args()
    entries, _, _ = load(args.data)
    rows = [(e.id, text) for e in entries for _, text in e.texts()]
    tag = f"{args.data}-{Path(args.model).name or 'minilm'}"
    vecs = embed([t for _, t in rows], args.model, tag + "-rows")
    labels = [e for e, _ in rows]
    print(f"{args.data}: {vecs.shape[0]} rows x {vecs.shape[1]}, {len(set(labels))} entries")
    for budget in (HeadTrainer.STEP_SECONDS, 1e6):
        HeadTrainer.STEP_SECONDS = budget
        trainer = HeadTrainer(vecs, labels, c=args.c,
                              texts=None if args.no_words else [t for _, t in rows])
        steps = []
        t0 = time.perf_counter()
        while True:
            s = time.perf_counter()
            done = trainer.step()
            steps.append((time.perf_counter() - s) * 1000)
            if done:
                break
        ms = np.array(steps)
        print(f"step budget {budget:g} s: {time.perf_counter() - t0:.1f} s in all, {len(ms)} "
              f"steps, {trainer.iterations} iterations; a step p50 {np.median(ms):.0f} ms, "
              f"p90 {np.percentile(ms, 90):.0f} ms, max {ms.max():.0f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
