"""Reads the text in a picture (rapidocr, ONNX models bundled in its wheel) in reading order."""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from supportqa_server.errors import NotAvailable

# rapidocr 3.10.0 ships these three models inside its wheel. Giving their paths explicitly makes
# rapidocr skip its downloader, which otherwise fetches any model missing from its cache dir.
DET_MODEL = "PP-OCRv6_det_small.onnx"  # DB text detector, ~10 MB
REC_MODEL = "PP-OCRv6_rec_small.onnx"  # CTC recogniser, ~21 MB; its charset is in the ONNX metadata
CLS_MODEL = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"  # 0/180 degree line classifier, ~0.6 MB

# Longest side / shortest side beyond which pictures are padded before OCR. rapidocr shrinks
# long sides over 2000 px and rounds sides to multiples of 32 px, so a 5x3000 strip becomes
# 0 px wide and raises; at 100 the short side stays >= 20 px, which rounds to 32.
MAX_ASPECT = 100


@dataclass(frozen=True)
class TextLine:
    """One line of text found in a picture.

    Attributes:
        text: The characters read, as the recogniser emitted them (no normalisation).
        confidence: Mean per-character probability from the recogniser, 0..1.
        left: x of the line box's left edge, in pixels of the image given to ``read``.
        top: y of the line box's top edge, in pixels of the image given to ``read``.
        height: the line box's height in pixels (0: unknown).
    """

    text: str
    confidence: float
    left: int
    top: int
    height: int = 0


def bundled_model_dir() -> Path:
    """Directory of the ONNX models shipped in the rapidocr wheel."""
    import rapidocr

    return Path(rapidocr.__file__).resolve().parent / "models"


class TextReader:
    """OCR for screenshots and photos: text detection, 0/180 degree line fix, recognition.

    Defaults are tuned for 2 CPU cores (docs/benchmarks/ocr.md):

    - the detector sees the picture scaled so that its short side is at least ``det_min_side``
      while its long side stays at most ``det_max_side``; rapidocr's default scales every short
      side up to 736 px: a 720x260 dialog became 2048x736, 8x the pixels, and read no better;
    - one crop per recogniser call: rapidocr pads every batch to at least 320x48 px and to its
      widest crop; recognising the 65 line crops of the benchmark pictures took 20% more CPU
      in batches of 6 than one by one, 80% more in batches of 16;
    - one onnxruntime thread: the server runs OCR beside the text encoder and Whisper on the
      same cores; on a busy 2-core machine 2 threads took 1.5-1.8x the wall and CPU time of 1.

    The angle classifier stays on: skipping it saved no measurable time (its model is 0.6 MB),
    and it is what lets a label photographed upside down be read.

    Models are loaded and run once in the constructor, so the first ``read`` pays no load time.

    Calls are serialised with a lock: rapidocr keeps per-call state on the engine.

    Args:
        min_confidence: Lines whose recogniser confidence is below this are dropped (0..1).
        det_min_side: Pictures whose short side is below this many pixels are scaled up for the
            detector (small screenshots carry 8-12 px text, too thin for the detector).
        det_max_side: The detector never sees a long side over this many pixels; 0 means no
            limit. Recognition still reads line crops from the full-resolution picture.
        use_angle_classifier: Run the 0/180 degree classifier on each line before recognition,
            so upside-down text is read. Screenshots never need it.
        threads: onnxruntime intra-op threads per model; 0 lets onnxruntime choose (one per
            core).
        rec_batch_size: Line crops per recogniser call; crops are sorted by width and each
            batch is padded to its widest crop.
        model_dir: Directory holding the three ONNX models; default is rapidocr's wheel.

    Raises:
        NotAvailable: rapidocr or its bundled models are missing.
    """

    def __init__(
        self,
        *,
        min_confidence: float = 0.5,
        det_min_side: int = 560,
        det_max_side: int = 960,
        use_angle_classifier: bool = True,
        threads: int = 1,
        rec_batch_size: int = 1,
        model_dir: str | Path | None = None,
    ) -> None:
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be within 0..1, got {min_confidence}")
        if det_min_side < 32 or (det_max_side and det_max_side < det_min_side):
            raise ValueError(
                f"need 32 <= det_min_side <= det_max_side (or det_max_side=0), "
                f"got {det_min_side} and {det_max_side}"
            )
        if threads < 0 or rec_batch_size < 1:
            raise ValueError(
                f"threads must be >= 0 and rec_batch_size >= 1, got {threads}, {rec_batch_size}"
            )
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise NotAvailable(
                "image text reading needs rapidocr: pip install rapidocr==3.10.0 onnxruntime"
            ) from e

        models = Path(model_dir) if model_dir is not None else bundled_model_dir()
        missing = [m for m in (DET_MODEL, REC_MODEL, CLS_MODEL) if not (models / m).is_file()]
        if missing:
            raise NotAvailable(
                f"OCR models {', '.join(missing)} are missing from {models}: reinstall "
                "rapidocr==3.10.0 (its wheel ships them) or pass model_dir"
            )

        self.min_confidence = min_confidence
        self.det_min_side = det_min_side
        self.det_max_side = det_max_side
        self.use_angle_classifier = use_angle_classifier
        self._lock = threading.Lock()
        self._engine = RapidOCR(
            params={
                "Global.log_level": "error",  # "warning" logs each picture without text
                "Global.text_score": min_confidence,
                "Global.use_cls": use_angle_classifier,
                "Global.model_root_dir": str(models),
                "Det.model_path": str(models / DET_MODEL),
                "Cls.model_path": str(models / CLS_MODEL),
                "Rec.model_path": str(models / REC_MODEL),
                "Rec.rec_batch_num": rec_batch_size,
                "EngineConfig.onnxruntime.intra_op_num_threads": threads or -1,
            }
        )
        self._warm_up()

    def read(self, image: Image.Image) -> list[TextLine]:
        """Reads the text lines of one picture.

        Args:
            image: Any PIL image; it is converted to RGB.

        Returns:
            Lines in reading order (rows top to bottom, left to right within a row), without
            empty lines and lines below ``min_confidence``. Empty when no text is found.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        min_short = -(-max(width, height) // MAX_ASPECT)
        if min(width, height) < min_short:
            # Pad right or bottom, so box coordinates stay those of the original picture.
            canvas = Image.new(
                "RGB", (max(width, min_short), max(height, min_short)), image.getpixel((0, 0))
            )
            canvas.paste(image, (0, 0))
            image, (width, height) = canvas, canvas.size
        with self._lock:
            self._size_detector(width, height)
            result = self._engine(image)
        boxes = getattr(result, "boxes", None)
        texts = getattr(result, "txts", None)
        scores = getattr(result, "scores", None)
        if boxes is None or texts is None or scores is None:
            return []
        found = []
        for box, text, score in zip(boxes, texts, scores, strict=True):
            text = text.strip()
            if not text or score < self.min_confidence:
                continue
            xs, ys = box[:, 0], box[:, 1]  # box: (4, 2) corners, x then y, pixels
            found.append((float(xs.min()), float(ys.min()), float(ys.max()), text, float(score)))
        return _reading_order(found)

    def read_batch(self, images: Sequence[Image.Image]) -> list[list[TextLine]]:
        """Reads several pictures; one list of lines per picture, in input order.

        Pictures are read one after another: detection is per picture, and recognising the
        crops of several pictures together would only make larger, more padded batches, which
        cost more CPU than single crops (see the class docstring).
        """
        return [self.read(image) for image in images]

    def _size_detector(self, width: int, height: int) -> None:
        short, long = min(width, height), max(width, height)
        scale = max(1.0, self.det_min_side / short)
        if self.det_max_side:
            scale = min(scale, self.det_max_side / long)
        # rapidocr's DetPreProcess scales by limit/short ("min", only up) or limit/long ("max",
        # only down), then rounds both sides to multiples of 32 px.
        det = self._engine.text_det
        if scale >= 1.0:
            det.limit_type, det.limit_side_len = "min", round(short * scale)
        else:
            det.limit_type, det.limit_side_len = "max", round(long * scale)

    def _warm_up(self) -> None:
        # rapidocr loads each model on first use; one read of a rendered word loads them now.
        img = Image.new("RGB", (160, 48), (255, 255, 255))
        ImageDraw.Draw(img).text((8, 8), "Ready 42", font=ImageFont.load_default(size=26), fill=0)
        self._engine.cfg.Det.limit_type, self._engine.cfg.Det.limit_side_len = "max", 160
        self._engine(img)
        loaded = self._engine.text_det is not None and self._engine.text_rec is not None
        if not loaded or (self.use_angle_classifier and self._engine.text_cls is None):
            raise NotAvailable("rapidocr did not load its models on a test picture")


def joined_text(lines: Sequence[TextLine]) -> str:
    """Text of the lines as one string for the text encoder, a line per row of ``lines``.

    Full-width and compatibility forms that OCR emits for CJK text are folded to their plain
    forms (NFKC: "￥" -> "¥", "℃" -> "°C", "１" -> "1"), and runs of spaces collapsed, so the
    encoder sees the tokens a typed question would give.
    """
    out = []
    for line in lines:
        text = " ".join(unicodedata.normalize("NFKC", line.text).split())
        if text:
            out.append(text)
    return "\n".join(out)


# A line that is only a clock time or a date: chat timestamps, status bars.
_CLOCK = re.compile(r"^(\d{1,2}[:.]\d{2}(\s*[ap]\.?m\.?)?|\d{1,2}/\d{1,2}(/\d{2,4})?)$", re.I)
_WORD_CHAR = re.compile(r"\w")


def text_blocks(lines: Sequence[TextLine]) -> list[list[TextLine]]:
    """Groups lines (in reading order) into blocks: paragraphs, bubbles, titles, buttons.

    A line continues the block above it when it starts a new row, its box is about as tall
    (within 60%: another font size is another element) and the gap above it is under 0.8 line
    heights (wrapped lines sit closer than separate elements). Lines with no height start
    blocks of their own.
    """
    blocks: list[list[TextLine]] = []
    for line in lines:
        prev = blocks[-1][-1] if blocks else None
        if prev is not None and prev.height > 0 and line.height > 0:
            tall, short = max(prev.height, line.height), min(prev.height, line.height)
            gap = line.top - (prev.top + prev.height)
            new_row = line.top > prev.top + prev.height / 2
            if new_row and tall <= 1.6 * short and gap < 0.8 * tall:
                blocks[-1].append(line)
                continue
        blocks.append([line])
    return blocks


def question_text(lines: Sequence[TextLine]) -> str:
    """The text of a screenshot that is most likely the question, for the text encoder.

    Screenshots carry chrome around the question: a window title, buttons, a clock. Those
    words pull the question's embedding towards every entry that mentions "support" or
    "send", so only the block with the most word characters is kept (``text_blocks``), after
    dropping lines that are only a time or a date. Pictures whose lines have no heights keep
    all their text.
    """
    kept = [ln for ln in lines if not _CLOCK.match(ln.text.strip())]
    if not kept or any(ln.height <= 0 for ln in kept):
        return joined_text(kept)
    blocks = text_blocks(kept)
    best = max(blocks, key=lambda b: sum(len(_WORD_CHAR.findall(ln.text)) for ln in b))
    return joined_text(best)


def _reading_order(found: list[tuple[float, float, float, str, float]]) -> list[TextLine]:
    """Sorts (left, top, bottom, text, confidence) boxes into rows, then rows into lines.

    Boxes are taken by their vertical centre; a box joins the current row when its centre lies
    within the vertical extent of the row's first box. Comparing with the first box, not the
    last, stops rows from chaining down a column of stacked small labels; comparing centres,
    not overlaps, keeps a small caption that touches a big word's edge on its own row.
    """
    rows: list[list[tuple[float, float, float, str, float]]] = []
    for item in sorted(found, key=lambda f: (f[1] + f[2]) / 2):
        if rows and rows[-1][0][1] <= (item[1] + item[2]) / 2 <= rows[-1][0][2]:
            rows[-1].append(item)
        else:
            rows.append([item])
    return [
        TextLine(text=text, confidence=conf, left=round(left), top=round(top),
                 height=round(bottom - top))
        for row in rows
        for left, top, bottom, text, conf in sorted(row, key=lambda f: f[0])
    ]
