"""Assembles docs/benchmarks.md from the per-benchmark reports docs/bench_*.md."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
ORDER = ["bench_text.md", "bench_server_voice.md", "bench_voice.md", "bench_ocr.md",
         "bench_milvus.md"]
INTRO = """# Benchmarks

Measured on the 2-core, no-GPU development machine. These machines are noisy (+-30-50% between
runs, more while other work runs): every comparison below was measured in ONE run of its
script, so read the ratios and medians, not lone absolute times. Each section names the command
that produced it; `make bench` reruns them all and rebuilds this file.

"""


def main() -> None:
    parts = [INTRO]
    summary = DOCS / "bench_summary.md"
    if summary.exists():
        parts.append(summary.read_text().strip() + "\n\n")
    for name in ORDER:
        path = DOCS / name
        if path.exists():
            text = path.read_text().strip()
            # Demote each report's headings one level under this page's title.
            text = "\n".join("#" + line if line.startswith("#") else line
                             for line in text.splitlines())
            parts.append(text + "\n\n")
    (DOCS / "benchmarks.md").write_text("".join(parts).rstrip() + "\n")


if __name__ == "__main__":
    main()
