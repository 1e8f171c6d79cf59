"""A tiny randomly initialised CLIP saved like a hub checkpoint, for tests that need no weights."""

from __future__ import annotations

from pathlib import Path

PROJECTION_DIM = 16  # width of the shared image/text space
IMAGE_SIZE = 32  # pixels per side the vision tower sees
SEED = 0  # same seed, same weights, same vectors

# A few byte-pair merges so that common words become single tokens, as in a real CLIP vocab.
_MERGES = [
    ("e", "r</w>"),
    ("o", "r</w>"),
    ("c", "a"),
    ("ca", "r"),
    ("car", "d</w>"),
    ("e", "d</w>"),
    ("i", "n"),
]


def make_tiny_clip(path: str | Path) -> Path:
    """Writes a tiny random CLIP (model, tokenizer, image processor) to ``path``.

    The directory has the layout of ``openai/clip-vit-base-patch32`` (config.json,
    model.safetensors, tokenizer and preprocessor configs) and loads with
    ``CLIPModel.from_pretrained`` / ``AutoProcessor.from_pretrained``; everything is built offline.
    Vision tower: 32x32 pictures in 8x8 patches, width 32, 2 layers; text tower: byte-level BPE
    vocab of 521 tokens, width 32, 2 layers; both projected to 16 dimensions.

    Args:
        path: Directory to write; created if missing.

    Returns:
        ``path`` as a Path.
    """
    import torch
    from tokenizers import pre_tokenizers
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    tokens += [a + b for a, b in _MERGES]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(_MERGES), model_max_length=77)

    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=PROJECTION_DIM,
    )
    torch.manual_seed(SEED)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
