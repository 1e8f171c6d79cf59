"""Text QPS of this checkout against another commit, measured in alternating turns.

The machines drift by 10-30% within minutes, so two servers measured one after the other are
not comparable; this runs them in turns (old, new, old, new, ...) on the same knowledge base,
each turn a fresh server, and prints every turn and the medians, batching on and off.
Usage: python benchmarks/ab_text.py --baseline b23e5d3 [--rounds 3] [--duration 10] [-c 32]
       python benchmarks/ab_text.py --baseline-env SUPPORTQA_HEAD_WORDS=false  (a setting's
       cost: this checkout against itself with that environment)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_text import ROOT, Server, banking_entries, load


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline", help="git commit to compare against (default: this checkout)")
    ap.add_argument("--baseline-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment of the baseline's server (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per turn")
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("--port", type=int, default=50392)
    args = ap.parse_args()
    if not args.baseline and not args.baseline_env:
        ap.error("give --baseline COMMIT, --baseline-env NAME=VALUE, or both")
    if any("=" not in kv for kv in args.baseline_env):
        ap.error("--baseline-env takes NAME=VALUE")
    baseline_env = dict(kv.split("=", 1) for kv in args.baseline_env)
    kb = "banking"
    entries, texts = banking_entries(kb)
    queries = [texts[i] for i in np.random.default_rng(7).permutation(len(texts))]
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "baseline"
        if args.baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                            args.baseline], check=True, capture_output=True)
            baseline_env["PYTHONPATH"] = str(old / "server")
        try:
            data = Path(tmp) / "data"
            srv = Server(data, args.port)
            from supportqa.client import SupportClient

            with SupportClient(srv.target, timeout=600) as c:
                c.upsert(entries)
            srv.stop()
            sides = {"baseline": baseline_env, "this": {}}
            qps: dict[tuple[str, str], list[float]] = {}
            for r in range(args.rounds):
                for batching, extra in (("on", {}), ("off", {"SUPPORTQA_MAX_BATCH": "1"})):
                    for side, env in sides.items():
                        srv = Server(data, args.port, **{**env, **extra})
                        asyncio.run(load(srv.target, kb, queries, args.concurrency, 3))
                        out = asyncio.run(load(srv.target, kb, queries, args.concurrency,
                                               args.duration))
                        srv.stop()
                        qps.setdefault((side, batching), []).append(out["rps"])
                        print(f"round {r + 1} batching {batching} {side}: {out['rps']:.1f} QPS, "
                              f"p50 {out['latency_ms']['p50']:.1f} ms, errors {out['errors']}",
                              flush=True)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(old)], check=False, capture_output=True)
    med = {k: statistics.median(v) for k, v in qps.items()}
    print(f"\nconcurrency {args.concurrency}, medians of {args.rounds} turns "
          f"(baseline {args.baseline or 'this checkout'}"
          f"{''.join(f', {kv}' for kv in args.baseline_env)}):")
    for batching in ("on", "off"):
        b, t = med[("baseline", batching)], med[("this", batching)]
        print(f"  batching {batching}: baseline {b:.1f}, this {t:.1f} QPS ({t / b:.2f}x)")
    for side in sides:
        print(f"  {side}: on/off {med[(side, 'on')] / med[(side, 'off')]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
