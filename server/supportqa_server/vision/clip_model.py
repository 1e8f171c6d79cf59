"""Image encoder: pictures and texts into one CLIP space, to match question images to entries."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from supportqa_server.errors import NotAvailable

REFERENCE_MODEL = "openai/clip-vit-base-patch32"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name; anything else is meant as a path


class ImageEncoder:
    """A CLIP-like dual encoder: ``get_image_features`` and ``get_text_features`` projected into
    one space, L2-normalised so a dot product is a cosine.

    Loads ``CLIPModel`` + ``CLIPProcessor`` or any model the Auto classes resolve to with the
    same two methods (SigLIP, ALIGN, ...). Weights run in fp16 on CUDA and fp32 elsewhere.

    Args:
        model: Local directory of a saved model, or a hub id such as
            ``openai/clip-vit-base-patch32`` that is in the Hugging Face cache (or downloadable
            when the machine is online and ``HF_HUB_OFFLINE`` is unset).
        device: torch device string ("cpu", "cuda:0", "mps").
        precision: auto | float32 | bfloat16 | float16 (devices.resolve_precision).

    Raises:
        NotAvailable: The model cannot be found or loaded, or has no image and text towers.
    """

    def __init__(self, model: str, device: str = "cpu", precision: str = "auto") -> None:
        import torch
        from transformers import AutoModel, AutoProcessor

        from supportqa_server.runtime.devices import resolve_precision

        self.model_name = model
        self.device = device
        if not model:
            raise NotAvailable(
                f"no CLIP model given: set a local directory or a hub id such as {REFERENCE_MODEL}"
            )
        local = Path(model).expanduser()
        if local.exists():
            source, local_only = str(local), True
        elif _HUB_ID.match(model):
            source, local_only = model, False
        else:
            raise NotAvailable(
                f"CLIP model directory {model!r} does not exist: "
                f"give the directory of a saved model, e.g. a copy of {REFERENCE_MODEL}"
            )
        where = (
            f"the directory {source!r} does not hold a complete model (config.json, weights, "
            "tokenizer and preprocessor files)"
            if local_only
            else f"{source!r} is not in the Hugging Face cache and could not be downloaded "
            "(offline?)"
        )
        how = (
            f"On a machine with internet run `hf download {REFERENCE_MODEL} --local-dir "
            "clip-vit-base-patch32`, copy that directory here and set SUPPORTQA_CLIP_MODEL to "
            "its path"
        )
        try:
            self._model = AutoModel.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError, KeyError) as e:
            raise NotAvailable(f"cannot load CLIP model: {where}. {how}") from e
        if not (
            hasattr(self._model, "get_image_features") and hasattr(self._model, "get_text_features")
        ):
            raise NotAvailable(
                f"model {model!r} ({type(self._model).__name__}) has no image and text towers "
                f"(get_image_features / get_text_features): use a CLIP-like model such as "
                f"{REFERENCE_MODEL}"
            )
        try:
            self._processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError, KeyError) as e:
            raise NotAvailable(f"cannot load the CLIP processor: {where}. {how}") from e
        self._dtype = resolve_precision(precision, device)
        self._model.eval().to(device, self._dtype)
        self._torch = torch
        config = self._model.config
        # CLIP's text tower has learned positions for 77 tokens; longer texts are cut there.
        text_config = getattr(config, "text_config", None)
        self._max_tokens = int(getattr(text_config, "max_position_embeddings", 77))
        projection = getattr(config, "projection_dim", None)
        self.dim: int = (
            int(projection) if projection else int(self.embed_texts(["dimension probe"]).shape[1])
        )

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Embeds pictures.

        Args:
            images: PIL images of any size and mode; the processor resizes and crops them to
                the vision tower's input (224x224 for CLIP ViT-B/32).
            batch_size: Pictures per forward pass; bounds memory at ingest.

        Returns:
            float32 array (N, dim), each row of unit length.
        """
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self._embed(rgb, batch_size, self._image_batch)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeds texts into the same space as ``embed_images``.

        Args:
            texts: Strings; each is cut at the text tower's context (77 tokens for CLIP).
            batch_size: Texts per forward pass.

        Returns:
            float32 array (N, dim), each row of unit length.
        """
        return self._embed(list(texts), batch_size, self._text_batch)

    def _embed(self, items: list, batch_size: int, run) -> np.ndarray:
        if not items:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        torch = self._torch
        parts = []
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                feats = run(items[start : start + batch_size])  # (B, dim)
                parts.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _image_batch(self, images: list[Image.Image]):
        inputs = self._processor(images=images, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, dtype=self._dtype)  # (B, 3, H, W)
        return _features(self._model.get_image_features(pixel_values=pixels))

    def _text_batch(self, texts: list[str]):
        inputs = self._processor(
            text=texts,
            padding=True,
            truncation=True,
            max_length=self._max_tokens,
            return_tensors="pt",
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}  # input_ids (B, T), mask
        return _features(self._model.get_text_features(**inputs))


def _features(output):
    """The projected embeddings (B, dim) from get_*_features.

    transformers 4.x returns the tensor; 5.x returns a ModelOutput whose ``pooler_output``
    holds the projection (``last_hidden_state`` is the unprojected tower output).
    """
    if hasattr(output, "pooler_output"):
        return output.pooler_output
    if isinstance(output, tuple):
        return output[1]
    return output
