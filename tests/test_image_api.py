"""Image questions end to end: OCR (Read), a tiny random CLIP (See), text + image fusion."""

from __future__ import annotations

import io

import grpc
import pytest
from conftest import SAMPLE_KB
from PIL import Image, ImageDraw, ImageFont
from supportqa.client import AsyncSupportClient, SupportQAError
from supportqa.knowledge_file import read_entries
from supportqa.v1 import supportqa_pb2 as pb

pytestmark = pytest.mark.slow

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def font(size: int):
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default(size)


def error_dialog(message: str, fmt: str = "PNG") -> bytes:
    """An app error dialog: grey backdrop, white card, red title bar, the message, an OK button."""
    img = Image.new("RGB", (760, 300), (96, 103, 112))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((30, 25, 730, 275), radius=14, fill=(250, 250, 252), outline=(60, 60, 60))
    d.rectangle((31, 26, 729, 72), fill=(200, 40, 45))
    d.text((55, 36), "Parcel Bank", font=font(22), fill=(255, 255, 255))
    d.ellipse((55, 105, 95, 145), fill=(230, 160, 30))
    d.text((70, 108), "!", font=font(28), fill=(255, 255, 255))
    d.text((115, 112), message, font=font(21), fill=(35, 35, 70))
    d.rounded_rectangle((560, 205, 700, 250), radius=8, fill=(30, 110, 220))
    d.text((612, 214), "OK", font=font(20), fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def blank(color=(240, 240, 240), size=(400, 300)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
async def read_server(tmp_path_factory):
    from supportqa_server.api.server import running_server
    from supportqa_server.runtime.settings import Settings

    settings = Settings(port=0, data_dir=tmp_path_factory.mktemp("img"), speech_model="",
                        ocr=True, clip_model="", max_image_pixels=4_000_000)
    async with running_server(settings) as target:
        async with AsyncSupportClient(target, timeout=120) as c:
            await c.upsert(read_entries(SAMPLE_KB))
        yield target


@pytest.fixture
async def iclient(read_server):
    async with AsyncSupportClient(read_server, timeout=120, retries=0) as c:
        yield c


@pytest.mark.parametrize(
    ("message", "entry_id"),
    [
        ("Error 4012: Card declined by issuer", "error-4012-card-declined-by-issuer"),
        ("ERR_TOPUP_LIMIT: Monthly top-up limit reached", "error-topup-limit"),
        ("Transfer failed (code 51): insufficient funds",
         "error-transfer-code-51-insufficient-funds"),
    ],
)
async def test_error_dialog_screenshot_gets_its_entry(iclient, message, entry_id):
    events = [ev async for ev in iclient.ask_stream(image=error_dialog(message),
                                                    image_mime="image/png")]
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["Accepted", "ImageText"] and kinds[-1] == "Done"
    read = " ".join(line.text for line in events[1].lines)
    assert message.split(":")[0].split("(")[0].strip().lower() in read.lower()
    answers = [e for e in events if isinstance(e, pb.Answer)]
    assert answers[0].entry_id == entry_id, (read, [a.entry_id for a in answers])
    assert pb.ROUTE_READ in answers[0].routes
    assert events[-1].timings.read_us > 0


async def test_text_and_image_together(iclient):
    shot = error_dialog("Transfer failed (code 61): daily transfer limit exceeded", "JPEG")
    r = await iclient.ask("why did my payment to my landlord fail", image=shot,
                          image_mime="image/jpeg")
    assert r.answers[0].entry_id == "error-transfer-code-61-daily-limit"
    assert pb.ROUTE_READ in r.answers[0].routes and pb.ROUTE_DENSE in r.answers[0].routes
    assert r.image_text.lines


async def test_image_without_text_and_see_off_is_no_answer(iclient):
    r = await iclient.ask(image=blank())
    assert r.HasField("no_answer")
    assert "readable text" in r.no_answer.reason


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"image": b"definitely not an image" * 20}, "image"),
        ({"image": b""}, "empty"),
        ({"image": blank(size=(3000, 2000))}, "limit"),
        ({"image": blank(), "image_mime": "image/jpeg"}, "png"),
    ],
)
async def test_bad_images_are_invalid_argument(iclient, kwargs, words):
    with pytest.raises(SupportQAError) as e:
        await iclient.ask(**kwargs)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in e.value.details.lower(), e.value.details
    assert (await iclient.ask("still fine?", min_score=0.0)).answers


async def test_tiny_clip_see_route(tmp_path):
    from supportqa_server.api.server import running_server
    from supportqa_server.runtime.settings import Settings
    from tiny_clip import make_tiny_clip

    clip_dir = make_tiny_clip(tmp_path / "tiny-clip")
    settings = Settings(port=0, data_dir=tmp_path / "data", speech_model="", ocr=False,
                        clip_model=str(clip_dir))
    pictures = {
        "red-card": blank((220, 30, 30)),
        "blue-card": blank((30, 30, 220)),
        "green-card": blank((30, 200, 60)),
    }
    entries = [
        pb.Entry(knowledge_base="see", id=k, title=k.replace("-", " "), answer=f"about {k}",
                 questions=[f"question about {k}"],
                 images=[pb.Image(data=v, mime_type="image/png")])
        for k, v in pictures.items()
    ]
    async with running_server(settings) as target:
        async with AsyncSupportClient(target, timeout=120, retries=0) as c:
            s = await c.upsert(entries)
            assert s.written == 3
            stats = await c.stats("see")
            kb = stats.knowledge_bases[0]
            assert kb.image_rows == 3 * (1 + 3)  # each: its picture, title, paraphrase, answer
            enc = next(x for x in stats.components if x.name == "image_encoder")
            assert enc.enabled and enc.detail.startswith("16-d")
            ocr = next(x for x in stats.components if x.name == "ocr")
            assert not ocr.enabled
            r = await c.ask(image=pictures["blue-card"], knowledge_base="see", min_score=0.0)
            assert r.answers[0].entry_id == "blue-card"
            assert pb.ROUTE_SEE in r.answers[0].routes
            assert r.answers[0].score > 0.99  # the very same picture
            # An entry whose picture changes is re-embedded: the old picture stops matching.
            moved = pb.Entry(knowledge_base="see", id="blue-card", title="blue card",
                             answer="about blue-card", questions=["question about blue-card"],
                             images=[pb.Image(data=blank((250, 250, 0)), mime_type="image/png")])
            await c.upsert([moved])
            r = await c.ask(image=pictures["blue-card"], knowledge_base="see", min_score=0.0)
            top = r.answers[0]
            assert not (top.entry_id == "blue-card" and top.score > 0.99)
