"""Synthetic questions for evaluation and benchmarks: espeak-ng speech, rendered screenshots."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Bump when render_screenshot changes its output, so on-disk caches of renderings go stale.
RENDER_VERSION = 1

DEFAULT_VOICE = "en-us"
DEFAULT_SPEED_WPM = 160  # espeak-ng words per minute; 175 is its default, 160 is clearer
DEFAULT_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")

# Fonts unsuitable for a chat screenshot: symbols only, or too thin to be legible.
_FONT_EXCLUDE = ("math", "symbol", "emoji", "extralight", "light", "dingbat")

STYLES = ("chat", "dialog")


class SynthesisError(RuntimeError):
    """espeak-ng is missing or failed."""


def speech_cache_path(
    text: str,
    cache_dir: str | Path,
    *,
    voice: str = DEFAULT_VOICE,
    speed_wpm: int = DEFAULT_SPEED_WPM,
) -> Path:
    """Returns where ``synthesize_speech`` caches the WAV of text.

    Args:
        text: The sentence.
        cache_dir: Root of the cache.
        voice: espeak-ng voice name.
        speed_wpm: Speaking rate in words per minute.

    Returns:
        ``cache_dir/speech/<sha256 of voice, rate and text>.wav``.
    """
    key = hashlib.sha256(f"{voice}\0{speed_wpm}\0{text}".encode()).hexdigest()
    return Path(cache_dir) / "speech" / f"{key}.wav"


def synthesize_speech(
    text: str,
    *,
    voice: str = DEFAULT_VOICE,
    speed_wpm: int = DEFAULT_SPEED_WPM,
    cache_dir: str | Path | None = None,
) -> bytes:
    """Speaks text with espeak-ng and returns the WAV bytes (mono 16-bit, 22.05 kHz).

    Args:
        text: The sentence to speak.
        voice: espeak-ng voice, e.g. "en-us", "en-gb", "de".
        speed_wpm: Speaking rate in words per minute.
        cache_dir: When given, the WAV is read from and written to
            ``speech_cache_path(text, cache_dir, ...)``.

    Returns:
        The WAV file's bytes.

    Raises:
        SynthesisError: espeak-ng is not installed, failed, or wrote no audio.
    """
    cached = (
        speech_cache_path(text, cache_dir, voice=voice, speed_wpm=speed_wpm) if cache_dir else None
    )
    if cached is not None and cached.is_file():
        return cached.read_bytes()
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SynthesisError(
            "espeak-ng is not installed; install it with apt-get install espeak-ng"
        )
    with tempfile.TemporaryDirectory(prefix="supportqa-tts-") as tmp:
        out = Path(tmp) / "out.wav"
        # The text goes through stdin so a question starting with "-" is not read as an option.
        proc = subprocess.run(
            [exe, "-v", voice, "-s", str(speed_wpm), "-w", str(out), "--stdin"],
            check=False,
            input=text.encode("utf-8"),
            capture_output=True,
            timeout=60,
        )
        if proc.returncode != 0 or not out.is_file() or out.stat().st_size <= 44:
            detail = proc.stderr.decode(errors="replace").strip() or "no audio written"
            raise SynthesisError(f"espeak-ng failed on {text[:60]!r} (voice {voice}): {detail}")
        data = out.read_bytes()
    if cached is not None:
        _write_atomic(cached, data)
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=1)
def available_fonts() -> tuple[str, ...]:
    """Returns paths of installed TrueType/OpenType fonts that render English, sorted.

    Uses ``fc-list :lang=en``; falls back to the DejaVu directory when fontconfig is missing.
    Symbol and very thin fonts are left out.
    """
    paths: list[str] = []
    if shutil.which("fc-list"):
        proc = subprocess.run(
            ["fc-list", ":lang=en", "file"], check=False, capture_output=True, text=True, timeout=30
        )
        paths = [line.split(":")[0].strip() for line in proc.stdout.splitlines()]
    if not paths and DEFAULT_FONT_DIR.is_dir():
        paths = [str(p) for p in DEFAULT_FONT_DIR.iterdir()]
    return tuple(
        sorted(
            p
            for p in set(paths)
            if p.lower().endswith((".ttf", ".otf"))
            and not any(word in Path(p).name.lower() for word in _FONT_EXCLUDE)
        )
    )


def _font(rng: random.Random, size: int, fonts: tuple[str, ...]) -> ImageFont.FreeTypeFont:
    if fonts:
        return ImageFont.truetype(rng.choice(fonts), size)
    return ImageFont.load_default(size)


def _wrap(text: str, font: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > max_width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def _text_block_height(lines: list[str], font: ImageFont.FreeTypeFont, spacing: int) -> int:
    ascent, descent = font.getmetrics()
    return len(lines) * (ascent + descent) + (len(lines) - 1) * spacing


def _draw_lines(draw, xy, lines, font, fill, spacing) -> None:
    ascent, descent = font.getmetrics()
    x, y = xy
    for line in lines:
        draw.text((x, y), line, font=font, fill=fill)
        y += ascent + descent + spacing


def _render_chat(text: str, rng: random.Random, fonts: tuple[str, ...]) -> Image.Image:
    width = rng.randrange(420, 820)  # px, phone to narrow desktop window
    size = rng.randrange(16, 25)  # px font size
    font = _font(rng, size, fonts)
    small = _font(rng, max(11, size - 6), fonts)
    spacing = size // 4
    pad = rng.randrange(10, 18)  # px inside the bubble
    margin = 16  # px between bubble and window edge
    lines = _wrap(text, font, width * 0.72 - 2 * pad)
    text_w = max(font.getlength(line) for line in lines)
    text_h = _text_block_height(lines, font, spacing)
    header_h = rng.randrange(44, 60)
    bubble_w, bubble_h = text_w + 2 * pad, text_h + 2 * pad
    height = int(header_h + 2 * margin + bubble_h + 24)
    dark = rng.random() < 0.25
    background = (24, 26, 30) if dark else rng.choice([(255, 255, 255), (242, 243, 247)])
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    header = rng.choice([(0, 122, 255), (37, 211, 102), (88, 86, 214), (52, 58, 64)])
    draw.rectangle((0, 0, width, header_h), fill=header)
    title = rng.choice(["Support", "Help chat", "Customer care", "Chat with us"])
    draw.text((margin, header_h // 2), title, font=small, fill=(255, 255, 255), anchor="lm")
    customer_blue = rng.random() < 0.5
    bubble_fill = (0, 122, 255) if customer_blue else ((58, 60, 66) if dark else (229, 229, 234))
    text_fill = (255, 255, 255) if customer_blue or dark else (20, 20, 20)
    x0 = width - margin - bubble_w
    y0 = header_h + margin
    draw.rounded_rectangle(
        (x0, y0, x0 + bubble_w, y0 + bubble_h), radius=min(18, pad + 6), fill=bubble_fill
    )
    _draw_lines(draw, (x0 + pad, y0 + pad), lines, font, text_fill, spacing)
    clock = f"{rng.randrange(8, 20):02d}:{rng.randrange(60):02d}"
    draw.text(
        (width - margin, y0 + bubble_h + 4), clock, font=small, fill=(140, 140, 140), anchor="ra"
    )
    return image


def _render_dialog(text: str, rng: random.Random, fonts: tuple[str, ...]) -> Image.Image:
    width = rng.randrange(460, 760)  # px
    size = rng.randrange(15, 23)  # px font size
    font = _font(rng, size, fonts)
    bold = _font(rng, size + 2, fonts)
    spacing = size // 4
    pad = 24  # px
    lines = _wrap(text, font, width - 2 * pad - 16)
    text_h = _text_block_height(lines, font, spacing)
    title_h = 40
    button_h = 36
    height = title_h + pad + text_h + 16 + pad + button_h + pad
    image = Image.new("RGB", (width, height), rng.choice([(236, 236, 236), (250, 250, 250)]))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width - 1, height - 1), outline=(160, 160, 160))
    dark_title = rng.random() < 0.5
    draw.rectangle((1, 1, width - 2, title_h), fill=(45, 55, 72) if dark_title else (222, 222, 222))
    title = rng.choice(["Contact support", "Ask a question", "Send feedback"])
    title_fill = (255, 255, 255) if dark_title else (30, 30, 30)
    draw.text((pad, title_h // 2), title, font=bold, fill=title_fill, anchor="lm")
    box = (pad, title_h + pad, width - pad, title_h + pad + text_h + 16)
    draw.rectangle(box, fill=(255, 255, 255), outline=(180, 180, 180))
    _draw_lines(draw, (pad + 8, box[1] + 8), lines, font, (25, 25, 25), spacing)
    button_w = 96
    bx1 = width - pad
    by0 = height - pad - button_h
    for label, fill, ink in (
        ("Send", (0, 120, 215), (255, 255, 255)),
        ("Cancel", None, (40, 40, 40)),
    ):
        draw.rounded_rectangle(
            (bx1 - button_w, by0, bx1, by0 + button_h), radius=6, fill=fill, outline=(150, 150, 150)
        )
        draw.text((bx1 - button_w / 2, by0 + button_h / 2), label, font=font, fill=ink, anchor="mm")
        bx1 -= button_w + 12
    return image


def render_screenshot(
    text: str, *, seed: int = 0, style: str | None = None, fonts: tuple[str, ...] | None = None
) -> bytes:
    """Renders text as a JPEG screenshot of a support chat bubble or an app's contact dialog.

    Layout, colours, font, font size, noise level and JPEG quality are drawn from a random
    generator seeded by (seed, text), so a question renders the same way on every run.

    Args:
        text: The question.
        seed: Run seed; change it for a different rendering of the same text.
        style: "chat" or "dialog"; None picks one at random.
        fonts: Font files to choose from; defaults to ``available_fonts()``, and Pillow's
            built-in font when none is installed.

    Returns:
        JPEG bytes, about 420-820 px wide.

    Raises:
        ValueError: text is blank or style is unknown.
    """
    if not text.strip():
        raise ValueError("cannot render a blank question; give some text")
    if style is not None and style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    # str seeds are hashed with SHA-512, so this does not depend on PYTHONHASHSEED.
    rng = random.Random(f"{RENDER_VERSION}:{seed}:{text}")
    fonts = available_fonts() if fonts is None else fonts
    style = style or rng.choice(STYLES)
    image = (_render_chat if style == "chat" else _render_dialog)(text, rng, fonts)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.7)))
    sigma = rng.uniform(2.0, 6.0)  # grey levels of Gaussian sensor noise
    noise = np.random.default_rng(rng.getrandbits(64)).normal(
        0.0, sigma, (image.height, image.width, 1)
    )
    pixels = np.asarray(image, dtype=np.float32) + noise  # (H, W, 3) + (H, W, 1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=rng.randrange(55, 90))
    return out.getvalue()


def screenshot_cache_path(text: str, cache_dir: str | Path, *, seed: int = 0) -> Path:
    """Returns where ``cached_screenshot`` keeps the rendering of text.

    Args:
        text: The question.
        cache_dir: Root of the cache.
        seed: Run seed.

    Returns:
        ``cache_dir/image/<sha256 of renderer version, seed and text>.jpg``.
    """
    key = hashlib.sha256(f"{RENDER_VERSION}\0{seed}\0{text}".encode()).hexdigest()
    return Path(cache_dir) / "image" / f"{key}.jpg"


def cached_screenshot(text: str, cache_dir: str | Path, *, seed: int = 0) -> bytes:
    """Returns ``render_screenshot(text, seed=seed)``, reading and writing an on-disk cache.

    Args:
        text: The question.
        cache_dir: Root of the cache.
        seed: Run seed.

    Returns:
        JPEG bytes.
    """
    path = screenshot_cache_path(text, cache_dir, seed=seed)
    if path.is_file():
        return path.read_bytes()
    data = render_screenshot(text, seed=seed)
    _write_atomic(path, data)
    return data
