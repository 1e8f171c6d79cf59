"""Tests for image decoding: formats, orientation, size limits and refused inputs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from supportqa_server.errors import InvalidInput, TooLarge
from supportqa_server.vision.images import decode_bytes, load_image

MAX_BYTES = 10_000_000  # 10 MB
MAX_PIXELS = 40_000_000  # 40 MP
RED, BLUE = (220, 20, 20), (20, 20, 220)


def _two_tone(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), RED)
    img.paste(BLUE, (width // 2, 0, width, height))
    return img


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _load(data: bytes, mime: str = "") -> Image.Image:
    return load_image(data, mime, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a few junk bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _close(pixel: tuple[int, int, int], expected: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(pixel, expected, strict=True))


@pytest.mark.parametrize(
    ("fmt", "mime", "kwargs"),
    [
        ("PNG", "image/png", {}),
        ("JPEG", "image/jpeg", {"quality": 95}),
        ("WEBP", "image/webp", {"quality": 95}),
        ("GIF", "image/gif", {}),
        ("BMP", "image/bmp", {}),
        ("TIFF", "image/tiff", {"compression": "tiff_lzw"}),
    ],
)
def test_each_format_decodes_to_rgb(fmt, mime, kwargs):
    data = _encode(_two_tone(), fmt, **kwargs)
    for declared in (mime, ""):
        img = _load(data, declared)
        assert img.mode == "RGB"
        assert img.size == (40, 20)
        assert _close(img.getpixel((5, 10)), RED)
        assert _close(img.getpixel((35, 10)), BLUE)


def test_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    img = _load(buf.getvalue(), "image/gif")
    assert _close(img.getpixel((8, 8)), RED)


def test_multi_picture_jpeg_gives_main_picture():
    # Phone cameras write MPO: a JPEG followed by more JPEGs. Declared and read as a JPEG.
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    data = _encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert _close(_load(data, "image/jpeg").getpixel((8, 8)), RED)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = _encode(_two_tone(40, 20), "JPEG", quality=95, exif=exif)
    img = _load(data, "image/jpeg")
    # Stored 40x20 with red on the left; displayed 20x40 with red on top.
    assert img.size == (20, 40)
    assert _close(img.getpixel((10, 5)), RED)
    assert _close(img.getpixel((10, 35)), BLUE)


def test_transparency_is_laid_over_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    out = _load(_encode(img, "PNG"))
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_16_bit_grey_is_scaled_not_clipped():
    samples = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    img = _load(_encode(Image.fromarray(samples), "PNG"))
    assert abs(img.getpixel((4, 4))[0] - 128) <= 1


def test_pixel_limit_checked_from_header_before_decoding():
    # The pixel data is junk: decoding it would raise InvalidInput, so TooLarge proves the
    # refusal came from the header alone.
    with pytest.raises(TooLarge) as err:
        _load(_png_header_only(12000, 9000), "image/png")
    assert str(err.value) == (
        "image is 12000x9000 = 108.0 MP; the limit is 40.0 MP: send a smaller picture"
    )


def test_pillow_decompression_bomb_error_becomes_too_large():
    # 10^10 pixels: Pillow itself refuses this in Image.open, even with a huge max_pixels.
    with pytest.raises(TooLarge, match="send a smaller picture"):
        load_image(_png_header_only(100_000, 100_000), max_bytes=MAX_BYTES, max_pixels=10**12)


def test_too_many_bytes():
    data = _encode(_two_tone(), "PNG")
    with pytest.raises(TooLarge, match=r"the limit is 0\.0 MB"):
        load_image(data, max_bytes=10, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    ("data", "mime", "message"),
    [
        (b"", "image/png", "image is empty"),
        (b"hello, this is not a picture", "", "not a valid PNG, JPEG"),
        (b"%PDF-1.7\n...", "image/png", "not a valid PNG, JPEG"),
        (_encode(_two_tone(), "PNG"), "image/jpeg", "declared as image/jpeg but its bytes are PNG"),
        (_encode(_two_tone(), "PNG"), "image/heic", "'image/heic' is not supported"),
        (_encode(_two_tone(), "PNG"), "text/plain", "'text/plain' is not supported"),
        (_encode(_two_tone(), "PNG")[:60], "image/png", "truncated or corrupt"),
    ],
    ids=["empty", "text", "pdf", "mime-mismatch", "heic", "text-mime", "truncated"],
)
def test_invalid_input(data, mime, message):
    with pytest.raises(InvalidInput, match=message):
        _load(data, mime)


@pytest.mark.parametrize(
    "mime", ["application/octet-stream", "IMAGE/PNG; charset=binary", "image/*"]
)
def test_generic_or_parameterised_mime_is_accepted(mime):
    assert _load(_encode(_two_tone(), "PNG"), mime).size == (40, 20)




def test_decode_budget_scales_a_big_jpeg_and_refuses_a_big_png():
    """A 6000x6000 picture would take ~360 MB to decode: as JPEG it is decoded at a scale that
    fits the budget (DCT scaling, never the full size), as PNG it is refused before decoding."""
    from supportqa_server.errors import Overloaded

    big = _two_tone(6000, 6000)
    budget = 100 * 2**20
    assert decode_bytes("RGB", 6000, 6000) > budget
    img = load_image(_encode(big, "JPEG"), max_bytes=2**30, max_pixels=10**9,
                     max_decode_bytes=budget)
    assert img.size == (3000, 3000) and img.mode == "RGB"
    assert _close(img.getpixel((100, 1500)), RED)
    with pytest.raises(Overloaded, match="over this server's 100 MiB per image"):
        load_image(_encode(big, "PNG"), max_bytes=2**30, max_pixels=10**9,
                   max_decode_bytes=budget)
    small = load_image(_encode(_two_tone(), "PNG"), max_bytes=2**30, max_pixels=10**9,
                       max_decode_bytes=budget)
    assert small.size == (40, 20)
