"""Tests for reading text in pictures with rapidocr: real models, known transcriptions."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont
from supportqa_server.vision.ocr import (
    TextLine,
    TextReader,
    _reading_order,
    joined_text,
    question_text,
    text_blocks,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

DIALOG_TITLE = "Payment failed"
DIALOG_ERROR = "Error 4012: Card declined by issuer"
DIALOG_HINT = "Please try another card or contact your bank."
DIALOG_BUTTON = "OK"
DIALOG_TEXT = "\n".join([DIALOG_TITLE, DIALOG_ERROR, DIALOG_HINT, DIALOG_BUTTON])

# ch_en_num.jpg (rapidocr's sample poster), transcribed by eye, one entry per text line in
# reading order: rows top to bottom, left to right within a row. "券后价¥" sits lower than the
# big "5.8" but on its row.
CH_EN_NUM_TEXT = "\n".join(
    [
        "正品促销",
        "大桶装更划算",
        "强力去污符合国标",
        "-40°C深度防冻不结冰",
        "日常价¥",
        "直击",
        "日常价¥",
        "10.0起",
        "10.0起",
        "底价",
        "券后价¥",
        "5.8起",
        "惊喜福利不容错过",
        "极速发货",
        "冰点标准",
        "破损就赔",
        "假一赔十",
    ]
)


def render_error_dialog(scale: float = 2.0) -> Image.Image:
    """A desktop error dialog, 360x130 pixels at scale 1, with a coloured error band.

    Uses the TrueType font bundled with Pillow, so it renders the same on any machine.
    """

    def px(v: float) -> int:
        return max(1, round(v * scale))

    def font(size: float) -> ImageFont.FreeTypeFont:
        return ImageFont.load_default(size=max(6, px(size)))

    w, h = px(360), px(130)
    img = Image.new("RGB", (w, h), (236, 236, 236))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w - 1, h - 1], outline=(90, 90, 90), width=px(1))
    d.rectangle([px(1), px(1), w - px(2), px(20)], fill=(40, 70, 140))  # title bar
    d.text((px(8), px(4)), DIALOG_TITLE, font=font(11), fill=(255, 255, 255))
    for a, b in (((15, 6), (7, 14)), ((15, 14), (7, 6))):  # close cross
        d.line(
            [w - px(a[0]), px(a[1]), w - px(b[0]), px(b[1])], fill=(255, 255, 255), width=px(1.5)
        )
    d.ellipse([px(12), px(32), px(44), px(64)], fill=(200, 30, 30))  # error icon
    d.rectangle([px(26), px(38), px(30), px(52)], fill=(255, 255, 255))
    d.rectangle([px(26), px(55), px(30), px(59)], fill=(255, 255, 255))
    d.rectangle([px(54), px(32), w - px(10), px(52)], fill=(255, 244, 214))  # pale yellow band
    d.text((px(58), px(35)), DIALOG_ERROR, font=font(12), fill=(170, 20, 20))  # dark red
    d.text((px(58), px(60)), DIALOG_HINT, font=font(10), fill=(60, 60, 60))
    d.rounded_rectangle(
        [w - px(80), h - px(34), w - px(14), h - px(12)],
        radius=px(4),
        fill=(0, 110, 200),
        outline=(0, 70, 150),
    )
    d.text((w - px(54), h - px(30)), DIALOG_BUTTON, font=font(11), fill=(255, 255, 255))
    return img


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(read: str, truth: str) -> float:
    """Character error rate: edit distance / reference length, after NFKC and with every run of
    whitespace (line breaks included) counted as one space."""

    def norm(t: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", t).split())

    return levenshtein(norm(read), norm(truth)) / max(1, len(norm(truth)))


@pytest.fixture(scope="module")
def reader() -> TextReader:
    return TextReader()


@pytest.fixture(scope="module")
def images() -> Path:
    if not (SHARED_DATA / "images").is_dir():
        pytest.skip(f"shared test images not found at {SHARED_DATA / 'images'}")
    return SHARED_DATA / "images"


def test_cer():
    assert cer("Error 4012", "Error 4012") == 0.0
    assert cer("Eror  4012\n", "Error 4012") == pytest.approx(0.1)
    assert cer("￥10", "¥10") == 0.0  # NFKC folds full-width forms


def test_reading_order_rows_then_columns():
    found = [  # (left, top, bottom, text, confidence)
        (200, 12, 30, "right", 0.9),
        (10, 50, 70, "second row", 0.9),
        (10, 10, 28, "left", 0.9),
        (120, 16, 24, "small", 0.9),  # centre 20: inside "left" (10..28), same row
        (10, 29, 40, "caption", 0.9),  # centre 34.5: below "left", its own row
    ]
    assert [line.text for line in _reading_order(found)] == [
        "left",
        "small",
        "right",
        "caption",
        "second row",
    ]


def test_joined_text_normalises():
    lines = [
        TextLine("日常价￥ ", 0.9, 0, 0),
        TextLine("  ", 0.9, 0, 9),
        TextLine("a  b", 0.9, 0, 20),
    ]
    assert joined_text(lines) == "日常价¥\na b"
    assert joined_text([]) == ""


def _chat_screenshot_lines() -> list[TextLine]:
    """Lines as the reader returns them for a chat screenshot: title, a wrapped bubble, clock."""
    return [
        TextLine("Customer care", 1.0, 20, 10, 30),  # window title: taller font
        TextLine("I have a transfer that is still", 1.0, 40, 80, 22),
        TextLine("pending, can you check?", 1.0, 40, 106, 20),  # wrapped: 4 px gap
        TextLine("19:48", 1.0, 300, 150, 14),  # clock under the bubble
        TextLine("Cancel", 1.0, 40, 200, 22),  # buttons, one row, far below
        TextLine("Send", 1.0, 200, 200, 22),
    ]


def test_text_blocks_split_by_gap_height_and_row():
    blocks = text_blocks(_chat_screenshot_lines())
    assert [[ln.text for ln in b] for b in blocks] == [
        ["Customer care"],
        ["I have a transfer that is still", "pending, can you check?"],
        ["19:48"],
        ["Cancel"],
        ["Send"],
    ]


def test_question_text_keeps_the_largest_block_without_chrome():
    assert question_text(_chat_screenshot_lines()) == (
        "I have a transfer that is still\npending, can you check?"
    )
    # A long title wins over a short message: the choice is by size, not by position.
    lines = [TextLine("Your payment could not be completed today", 1.0, 0, 0, 20),
             TextLine("Retry", 1.0, 0, 60, 20)]
    assert question_text(lines) == "Your payment could not be completed today"
    # Clock-only lines never count; lines without heights keep all their text.
    assert question_text([TextLine("12:05", 1.0, 0, 0, 20)]) == ""
    assert question_text([TextLine("a b", 1.0, 0, 0), TextLine("Send", 1.0, 0, 50)]) == "a b\nSend"


def test_constructor_validates():
    with pytest.raises(ValueError, match="min_confidence"):
        TextReader(min_confidence=1.5)
    with pytest.raises(ValueError, match="det_min_side"):
        TextReader(det_min_side=1000, det_max_side=500)


@pytest.mark.slow
def test_models_come_from_the_wheel_never_the_network(monkeypatch):
    import socket

    from rapidocr.utils.download_file import DownloadFile

    def refuse(*args, **kwargs):
        raise AssertionError("rapidocr tried to download")

    monkeypatch.setattr(DownloadFile, "run", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    lines = TextReader().read(render_error_dialog(2))
    assert DIALOG_ERROR in [line.text for line in lines]


@pytest.mark.slow
def test_missing_models_are_reported(tmp_path):
    from supportqa_server.errors import NotAvailable

    with pytest.raises(NotAvailable, match="reinstall rapidocr"):
        TextReader(model_dir=tmp_path)


# CER thresholds, from the measured CER of these pictures (docs/benchmarks/ocr.md) and the length of
# their transcriptions (after whitespace folding):
# - dialog, 99 characters, measured 0.00-0.03: the icon's "!" read as "0" and the close cross as
#   "X", a space lost in the 11 px title at scale 1. < 0.08 allows 7 errors; losing the error or
#   hint line costs 0.36 or 0.46, and each line is also checked on its own.
# - phototest, 284 characters, measured 0.000. < 0.02 allows 5 errors; losing the shortest line
#   ("of file format.") costs 0.056.
# - ch_en_num poster, 100 characters, measured 0.01 (a space between "5.8" and "起", read as two
#   boxes). < 0.06 allows 5 errors; losing a 4-character line costs 0.05 and fails with it; the
#   2-character lines are below what CER can see, so the long lines are also checked by name.


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_error_dialog(reader, scale):
    lines = reader.read(render_error_dialog(scale))
    texts = [line.text for line in lines]
    # The icon's "!" and the close cross are sometimes read as "0" or "X": allowed as noise.
    assert cer(joined_text(lines), DIALOG_TEXT) < 0.08, texts
    assert any(cer(t, DIALOG_ERROR) <= 1 / len(DIALOG_ERROR) for t in texts), texts
    assert any(cer(t, DIALOG_HINT) <= 2 / len(DIALOG_HINT) for t in texts), texts
    assert DIALOG_BUTTON in texts
    assert [t for t in texts if t in (DIALOG_TITLE, DIALOG_ERROR, DIALOG_HINT)] == [
        t for t in (DIALOG_TITLE, DIALOG_ERROR, DIALOG_HINT) if t in texts
    ], "lines out of reading order"
    assert all(0.5 <= line.confidence <= 1.0 for line in lines)


@pytest.mark.slow
def test_phototest(reader, images):
    truth = (images / "tesseract" / "phototest.txt").read_text(encoding="utf-8")
    lines = reader.read(Image.open(images / "tesseract" / "phototest.tif"))
    assert len(lines) == 8
    assert cer(joined_text(lines), truth) < 0.02, joined_text(lines)
    assert [line.top for line in lines] == sorted(line.top for line in lines)


@pytest.mark.slow
def test_upside_down_page_is_read(reader, images):
    truth = (images / "tesseract" / "phototest.txt").read_text(encoding="utf-8").splitlines()
    page = Image.open(images / "tesseract" / "phototest.tif").convert("RGB").rotate(180)
    texts = [line.text for line in reader.read(page)]
    # The angle classifier turns each line; the rows come bottom line first (the page's order
    # is not recovered), so lines are matched one by one.
    found = [t for t in filter(None, truth) if any(cer(r, t) < 0.05 for r in texts)]
    assert len(found) >= 7, texts


@pytest.mark.slow
def test_chinese_poster(reader, images):
    lines = reader.read(Image.open(images / "rapidocr" / "ch_en_num.jpg"))
    text = joined_text(lines)
    assert cer(text, CH_EN_NUM_TEXT) < 0.06, text
    for must in ("正品促销", "大桶装更划算", "强力去污符合国标", "惊喜福利不容错过", "假一赔十"):
        assert must in text


@pytest.mark.slow
@pytest.mark.parametrize("size", [(300, 200), (1, 1), (5, 3000), (3000, 5)])
def test_blank_picture_reads_nothing(reader, size):
    assert reader.read(Image.new("RGB", size, (255, 255, 255))) == []


@pytest.mark.slow
def test_text_in_a_long_strip(reader):
    # 3000x24: rapidocr alone fails on such strips (its resize rounds the short side to 0).
    strip = Image.new("RGB", (3000, 24), (255, 255, 255))
    font = ImageFont.load_default(size=18)
    ImageDraw.Draw(strip).text((2000, 2), "Error 4012 declined", font=font, fill=(0, 0, 0))
    lines = reader.read(strip)
    assert [line.text for line in lines] == ["Error 4012 declined"]
    assert 1980 <= lines[0].left <= 2010


@pytest.mark.slow
def test_read_batch_matches_read(reader):
    pictures = [render_error_dialog(1), Image.new("L", (64, 64), 255), render_error_dialog(2)]
    assert reader.read_batch(pictures) == [reader.read(p) for p in pictures]
    assert reader.read_batch([]) == []
