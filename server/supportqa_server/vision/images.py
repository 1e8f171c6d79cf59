"""Decodes a question's image bytes into an upright RGB picture, refusing unsafe inputs."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from supportqa_server.errors import InvalidInput, Overloaded, TooLarge

# Pillow format ids we decode. Pillow's JPEG opener also returns "MPO" for the multi-picture
# JPEGs that phone cameras write; it decodes as its first (main) picture.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
SUPPORTED = "PNG, JPEG, WebP, GIF, BMP or TIFF"

# Declared mime type -> the Pillow formats its bytes may hold. Types a client sends when it does
# not know better are treated as undeclared.
_FORMATS_OF_MIME = {
    "image/png": {"PNG"},
    "image/x-png": {"PNG"},
    "image/apng": {"PNG"},
    "image/jpeg": {"JPEG", "MPO"},
    "image/jpg": {"JPEG", "MPO"},
    "image/pjpeg": {"JPEG", "MPO"},
    "image/webp": {"WEBP"},
    "image/gif": {"GIF"},
    "image/bmp": {"BMP"},
    "image/x-bmp": {"BMP"},
    "image/x-ms-bmp": {"BMP"},
    "image/tiff": {"TIFF"},
    "image/tif": {"TIFF"},
    "image/x-tiff": {"TIFF"},
}
_UNDECLARED = {"", "application/octet-stream", "binary/octet-stream", "image/*"}

# Modes with more than 8 bits per sample: Pillow's convert("RGB") clips them instead of scaling.
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
# Bytes per pixel of a decoded image by Pillow mode (others: 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3,
               "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_JPEG_SCALES = (2, 4, 8)  # DCT scaling a JPEG decoder does while decoding (Image.draft)


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Peak bytes of decoding a width x height image of ``mode`` into RGB: the decoded pixels,
    then at most two RGB copies and a mask (transparency laid over white); wide modes add a
    float32 copy."""
    extra = 3 + 3 + 1 + (8 if mode in _WIDE_MODES else 0)
    return width * height * (_MODE_BYTES.get(mode, 4) + extra)


def load_image(data: bytes, mime_type: str = "", *, max_bytes: int, max_pixels: int,
               max_decode_bytes: int = 0) -> Image.Image:
    """Decodes image bytes into an upright RGB picture.

    Only the header is read before the size checks, so a decompression bomb is refused before any
    pixel is decoded. Animated GIF, WebP and PNG give their first frame, multi-page TIFF its first
    page. EXIF orientation is applied; transparent areas are laid over white.

    Args:
        data: The encoded image (PNG, JPEG, WebP, GIF, BMP or TIFF).
        mime_type: The type the sender declared, e.g. ``"image/png"``; empty or
            ``application/octet-stream`` when unknown. Parameters after ``;`` are ignored.
        max_bytes: Largest accepted ``len(data)``.
        max_pixels: Largest accepted width x height.
        max_decode_bytes: Memory the decode may take (`decode_bytes`); a JPEG over it is
            decoded at a scale that fits, other formats are refused. 0: no limit.

    Returns:
        An RGB image, fully decoded.

    Raises:
        InvalidInput: Empty bytes, bytes that are not a supported image, a declared type that is
            not supported or does not match the bytes, or a truncated or corrupt file.
        TooLarge: More than ``max_bytes`` bytes or ``max_pixels`` pixels.
        Overloaded: Decoding would take more than ``max_decode_bytes``.
    """
    if not data:
        raise InvalidInput("image is empty: send the picture's bytes")
    if len(data) > max_bytes:
        raise TooLarge(
            f"image is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB: "
            "send a smaller or more compressed picture"
        )
    declared = mime_type.split(";", 1)[0].strip().lower()
    if declared not in _UNDECLARED and declared not in _FORMATS_OF_MIME:
        raise InvalidInput(f"image type {declared!r} is not supported: send {SUPPORTED}")

    with warnings.catch_warnings():
        # Our own max_pixels check below replaces Pillow's warning-sized limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError as e:
            raise TooLarge(
                f"image has too many pixels to decode safely; the limit is "
                f"{max_pixels / 1e6:.1f} MP: send a smaller picture"
            ) from e
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise InvalidInput(
                f"could not read the image: it is not a valid {SUPPORTED} file"
            ) from e

    if declared in _FORMATS_OF_MIME and img.format not in _FORMATS_OF_MIME[declared]:
        raise InvalidInput(
            f"image was declared as {declared} but its bytes are {img.format}: "
            "send the right mime type or leave it empty"
        )
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidInput(f"image is {width}x{height} pixels: send a picture with content")
    if width * height > max_pixels:
        raise TooLarge(
            f"image is {width}x{height} = {width * height / 1e6:.1f} MP; "
            f"the limit is {max_pixels / 1e6:.1f} MP: send a smaller picture"
        )
    need = decode_bytes(img.mode, width, height)
    if max_decode_bytes and need > max_decode_bytes:
        if img.format in ("JPEG", "MPO"):
            for scale in _JPEG_SCALES:
                size = (-(-width // scale), -(-height // scale))
                if decode_bytes("RGB", *size) <= max_decode_bytes:
                    img.draft("RGB", size)
                    break
        if decode_bytes(img.mode, *img.size) > max_decode_bytes:
            raise Overloaded(
                f"image is {width}x{height} {img.format}: decoding it would take "
                f"{need / 2**20:.0f} MiB, over this server's "
                f"{max_decode_bytes / 2**20:.0f} MiB per image (SUPPORTQA_MAX_IMAGE_DECODE_BYTES)"
                ": send a smaller picture, or a JPEG"
            )

    try:
        img.load()
        img = _upright(img)
        return _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise TooLarge(
            f"image has too many pixels to decode safely; the limit is "
            f"{max_pixels / 1e6:.1f} MP: send a smaller picture"
        ) from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InvalidInput(
            f"could not decode the {img.format} image ({e}): the file is truncated or corrupt"
        ) from e


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block is no reason to refuse the picture
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _WIDE_MODES:
        samples = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(samples.max()), 1.0)
        low = 0.0 if img.mode.startswith("I;16") else min(float(samples.min()), 0.0)
        scaled = (samples - low) * (255.0 / (top - low))
        img = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))  # (H, W) uint8 -> "L"
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Pasted through its alpha onto white: one RGB copy and a mask, not three RGBA copies.
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGB"), mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":
        return img.convert("RGB")
    return img
