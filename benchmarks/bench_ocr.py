"""OCR latency and accuracy, rapidocr's default settings against ours, in one run.

Prints a markdown table. Each picture is read by every configuration in turn, round after
round, so background load on the machine hits all configurations alike. Each cell gives the
median wall time and the median CPU time of the process (all threads) per read; CPU time moves
less than wall time when other programs share the cores.

    python benchmarks/bench_ocr.py --rounds 7 --show-text
    python benchmarks/bench_ocr.py --config batch6:rec_batch_size=6 --config det640:det_min_side=640
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from supportqa_server.vision.ocr import TextReader, joined_text  # noqa: E402
from test_ocr import (  # noqa: E402
    CH_EN_NUM_TEXT,
    DIALOG_TEXT,
    SHARED_DATA,
    cer,
    render_error_dialog,
)

# rapidocr 3.10.0 config.yaml: detector scales every short side up to 736 px (limit_type min),
# angle classifier on, onnxruntime picks threads, 6 crops per recogniser call.
UNTUNED = {
    "det_min_side": 736,
    "det_max_side": 0,
    "use_angle_classifier": True,
    "threads": 0,
    "rec_batch_size": 6,
}
TUNED: dict = {}  # TextReader's defaults
TUNED_2_THREADS = {"threads": 2}

EN_JPG_TEXT = (
    "3 MovieShots Dataset\n"
    "To facilitate the shot type analysis in videos, we collect MovieShots, a large-scale\n"
    "shot type annotation set that contains 46K shots from 7858 movies. The details\n"
    "of this dataset are specified as follows."
)


PHONE_LINES = (
    "Wallet",
    "Top-up failed",
    "ERR_TOPUP_LIMIT",
    "You have reached your monthly",
    "top-up limit of 5,000 EUR.",
    "The limit resets on 1 December.",
    "Contact support",
)


def render_phone_screenshot() -> Image.Image:
    """A 1170x2532 phone screenshot (3x pixel density) of an app's error screen."""
    img = Image.new("RGB", (1170, 2532), (255, 255, 255))
    d = ImageDraw.Draw(img)

    def font(px: int) -> ImageFont.FreeTypeFont:
        return ImageFont.load_default(size=px)

    d.rectangle([0, 0, 1170, 300], fill=(245, 245, 250))
    d.text((80, 190), PHONE_LINES[0], font=font(64), fill=(20, 20, 20))
    d.ellipse([485, 600, 685, 800], fill=(230, 60, 60))
    d.text((80, 880), PHONE_LINES[1], font=font(60), fill=(20, 20, 20))
    d.rounded_rectangle([80, 990, 620, 1070], radius=16, fill=(253, 236, 236))
    d.text((100, 1005), PHONE_LINES[2], font=font(44), fill=(180, 30, 30))
    for i, line in enumerate(PHONE_LINES[3:6]):
        d.text((80, 1140 + i * 70), line, font=font(46), fill=(90, 90, 90))
    d.rounded_rectangle([80, 2250, 1090, 2390], radius=40, fill=(30, 90, 220))
    d.text((390, 2290), PHONE_LINES[6], font=font(50), fill=(255, 255, 255))
    return img


def pictures() -> list[tuple[str, Image.Image, str]]:
    """(name, picture, true text) for the rendered pictures and the shared images present."""
    out = [
        (f"dialog {round(360 * s)}x{round(130 * s)}", render_error_dialog(s), DIALOG_TEXT)
        for s in (1, 2, 4)
    ]
    out.append(("phone screenshot 1170x2532", render_phone_screenshot(), "\n".join(PHONE_LINES)))
    images = SHARED_DATA / "images"
    shared = [
        ("tesseract/phototest.tif", images / "tesseract" / "phototest.txt"),
        ("tesseract/eurotext.tif", images / "tesseract" / "eurotext.txt"),
        ("rapidocr/en.jpg", EN_JPG_TEXT),
        ("rapidocr/ch_en_num.jpg", CH_EN_NUM_TEXT),
    ]
    for name, truth in shared:
        path = images / name
        if not path.is_file():
            print(f"skipping {path}: not found", file=sys.stderr)
            continue
        if isinstance(truth, Path):
            truth = truth.read_text(encoding="utf-8")
        img = Image.open(path)
        img.load()
        out.append((f"{name} {img.width}x{img.height}", img.convert("RGB"), truth))
    return out


def parse_config(spec: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, TextReader keyword arguments)."""
    name, _, body = spec.partition(":")
    kwargs: dict = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = value == "true" if value in ("true", "false") else type_of(key)(value)
    return name, kwargs


def type_of(key: str) -> type:
    return float if key == "min_confidence" else int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed reads per picture")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="extra configuration name:key=value,... (TextReader arguments)",
    )
    parser.add_argument("--show-text", action="store_true", help="print each text read with errors")
    args = parser.parse_args()

    configs = [("untuned", UNTUNED), ("tuned", TUNED), ("tuned-2t", TUNED_2_THREADS)]
    configs += [parse_config(c) for c in args.config]
    load_before = os.getloadavg()[0]
    readers, load_s = {}, {}
    for name, kwargs in configs:
        t0 = time.perf_counter()
        readers[name] = TextReader(**kwargs)
        load_s[name] = time.perf_counter() - t0

    pics = pictures()
    wall: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    texts: dict[tuple[str, str], str] = {}
    for _ in range(args.rounds):
        for pic_name, img, _ in pics:
            for name, _ in configs:
                c0, t0 = time.process_time(), time.perf_counter()
                lines = readers[name].read(img)
                wall.setdefault((pic_name, name), []).append(time.perf_counter() - t0)
                cpu.setdefault((pic_name, name), []).append(time.process_time() - c0)
                texts[(pic_name, name)] = joined_text(lines)

    names = [n for n, _ in configs]
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after; median of {args.rounds} reads per cell, "
        "configurations interleaved"
    )
    print()
    for name, kwargs in configs:
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "TextReader defaults"
        print(f"- `{name}`: {shown}")
    print()
    header = ["picture"] + [f"{n} ms wall / CPU" for n in names] + [f"{n} CER" for n in names]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (2 * len(names))) + "|")
    for pic_name, _, truth in pics:
        ms = [
            f"{statistics.median(wall[(pic_name, n)]) * 1000:.0f} / "
            f"{statistics.median(cpu[(pic_name, n)]) * 1000:.0f}"
            for n in names
        ]
        errs = [f"{cer(texts[(pic_name, n)], truth):.3f}" for n in names]
        print(f"| {pic_name} | " + " | ".join(ms + errs) + " |")
    loads = [f"{load_s[n] * 1000:.0f}" for n in names]
    print("| load + warm-up read (once) | " + " | ".join(loads + [""] * len(names)) + " |")
    if args.show_text:
        print()
        for pic_name, _, truth in pics:
            for n in names:
                if cer(texts[(pic_name, n)], truth) > 0:
                    print(f"- {pic_name}, {n}: `{texts[(pic_name, n)]!r}`")


if __name__ == "__main__":
    main()
