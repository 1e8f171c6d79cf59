"""Tests of the synthetic voice and image questions."""

from __future__ import annotations

import io
import shutil
import wave

import pytest
from PIL import Image
from supportqa_tools import synth

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)"
)


@needs_espeak
def test_speech_is_a_wav_of_plausible_length(tmp_path):
    data = synth.synthesize_speech("Where is my new card?", cache_dir=tmp_path)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    with wave.open(io.BytesIO(data)) as w:
        seconds = w.getnframes() / w.getframerate()
        assert w.getnchannels() == 1
        assert w.getsampwidth() == 2  # 16-bit
    assert 0.5 < seconds < 5


@needs_espeak
def test_speech_is_cached_by_text_and_voice(tmp_path):
    path = synth.speech_cache_path("top up failed", tmp_path)
    assert not path.exists()
    first = synth.synthesize_speech("top up failed", cache_dir=tmp_path)
    assert path.read_bytes() == first
    assert synth.speech_cache_path("top up failed", tmp_path, voice="en-gb") != path
    path.write_bytes(b"RIFF-cached")
    assert synth.synthesize_speech("top up failed", cache_dir=tmp_path) == b"RIFF-cached"


@needs_espeak
def test_speech_text_starting_with_dash_is_spoken_not_parsed():
    assert synth.synthesize_speech("-v is not a flag here")[:4] == b"RIFF"


def test_speech_without_espeak_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(synth.SynthesisError, match="apt-get install espeak-ng"):
        synth.synthesize_speech("hello", cache_dir=tmp_path)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("style", synth.STYLES)
def test_screenshot_is_a_jpeg_of_sensible_size(style):
    data = synth.render_screenshot("My card payment was declined twice today", style=style)
    image = decode(data)
    assert image.format == "JPEG"
    assert image.mode == "RGB"
    assert 420 <= image.width <= 820
    assert 100 <= image.height <= 400
    assert 3_000 < len(data) < 200_000


def test_screenshot_is_deterministic_per_seed():
    text = "How do I change my PIN?"
    assert synth.render_screenshot(text, seed=1) == synth.render_screenshot(text, seed=1)
    assert synth.render_screenshot(text, seed=1) != synth.render_screenshot(text, seed=2)


def test_long_question_wraps_into_a_taller_image():
    short = decode(synth.render_screenshot("Refund?", style="dialog", seed=0))
    long = decode(synth.render_screenshot("Refund please? " * 20, style="dialog", seed=0))
    # Widths differ by at most 1.7x (460-760 px), the line count by 20x.
    assert long.height > 2 * short.height


def test_screenshot_without_installed_fonts_uses_builtin_font():
    decode(synth.render_screenshot("exchange rate", fonts=()))


def test_screenshot_rejects_blank_text_and_unknown_style():
    with pytest.raises(ValueError, match="blank"):
        synth.render_screenshot("  ")
    with pytest.raises(ValueError, match="style"):
        synth.render_screenshot("hi", style="poster")


def test_cached_screenshot_round_trips(tmp_path):
    data = synth.cached_screenshot("lost card", tmp_path, seed=5)
    assert synth.screenshot_cache_path("lost card", tmp_path, seed=5).read_bytes() == data
    assert synth.cached_screenshot("lost card", tmp_path, seed=5) == data


def test_available_fonts_are_font_files():
    assert all(p.lower().endswith((".ttf", ".otf")) for p in synth.available_fonts())
