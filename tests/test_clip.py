"""Tests for the CLIP image encoder on a tiny random CLIP: real loading code, made-up weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from supportqa_server.errors import NotAvailable
from supportqa_server.vision.clip_model import ImageEncoder
from tiny_clip import PROJECTION_DIM, make_tiny_clip

pytestmark = pytest.mark.slow  # imports transformers and builds a model: seconds


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def encoder(clip_dir):
    return ImageEncoder(str(clip_dir))


def _pictures() -> list[Image.Image]:
    striped = Image.new("RGB", (90, 40), (255, 255, 255))
    striped.paste((0, 0, 0), (0, 0, 90, 10))
    return [
        Image.new("RGB", (64, 48), (220, 30, 30)),
        Image.new("L", (20, 70), 128),  # grey, tall: converted and cropped by the processor
        striped,
    ]


def test_dimensions_and_norms(encoder, clip_dir):
    assert encoder.dim == PROJECTION_DIM
    assert encoder.model_name == str(clip_dir)
    assert encoder.device == "cpu"
    images = encoder.embed_images(_pictures())
    texts = encoder.embed_texts(["card declined", "error 4012 " * 60, ""])  # 2nd: over 77 tokens
    for vectors, n in ((images, 3), (texts, 3)):
        assert vectors.shape == (n, PROJECTION_DIM)
        assert vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(images[0], images[2], atol=1e-3)  # content changes the vector
    assert not np.allclose(texts[0], texts[1], atol=1e-3)


def test_deterministic_and_batch_independent(encoder, clip_dir):
    pictures = _pictures()
    together = encoder.embed_images(pictures)
    one_by_one = np.concatenate([encoder.embed_images([p]) for p in pictures])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    np.testing.assert_allclose(encoder.embed_images(pictures, batch_size=2), together, atol=1e-5)
    reloaded = ImageEncoder(str(clip_dir))
    np.testing.assert_allclose(reloaded.embed_images(pictures), together, atol=1e-6)
    np.testing.assert_allclose(
        reloaded.embed_texts(["card declined"]), encoder.embed_texts(["card declined"]), atol=1e-6
    )


def test_empty_batches(encoder):
    assert encoder.embed_images([]).shape == (0, PROJECTION_DIM)
    assert encoder.embed_texts([]).shape == (0, PROJECTION_DIM)


def test_missing_directory(tmp_path):
    with pytest.raises(NotAvailable, match="does not exist"):
        ImageEncoder(str(tmp_path / "no-such-clip"))


def test_uncached_hub_id_says_how_to_get_a_local_copy():
    # conftest sets HF_HUB_OFFLINE=1, so this fails at once instead of reaching the network.
    with pytest.raises(NotAvailable) as err:
        ImageEncoder("supportqa-tests/no-such-clip")
    message = str(err.value)
    assert "not in the Hugging Face cache" in message
    assert "hf download openai/clip-vit-base-patch32" in message
    assert "SUPPORTQA_CLIP_MODEL" in message


def test_incomplete_directory(tmp_path):
    with pytest.raises(NotAvailable, match="does not hold a complete model"):
        ImageEncoder(str(tmp_path))


def test_model_without_image_tower(tmp_path, clip_dir):
    from transformers import BertConfig, BertModel

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(clip_dir / name, tmp_path / name)
    BertModel(
        BertConfig(
            vocab_size=521,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(NotAvailable, match="no image and text towers"):
        ImageEncoder(str(tmp_path))


@pytest.mark.gpu
def test_fp16_on_cuda_matches_cpu(encoder, clip_dir):
    gpu = ImageEncoder(str(clip_dir), device="cuda:0")
    pictures = _pictures()
    cosines = np.sum(gpu.embed_images(pictures) * encoder.embed_images(pictures), axis=1)
    assert np.all(cosines > 0.99)
    assert gpu.embed_texts(["card declined"]).dtype == np.float32
