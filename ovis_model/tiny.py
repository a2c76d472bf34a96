"""Tiny Ovis models built from configs (no hub): for tests, smoke runs and the CPU demo."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from ovis_data.pack.tokenize import bundled_qwen_tokenizer_dir

from .configuration import OvisConfig, VisualTokenizerConfig
from .constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from .modeling import Ovis
from .preprocess import CLIP_MEAN, CLIP_STD, HALF, OvisImageProcessor


def tiny_llm_config(
    vocab_size: int = 256,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    family: str = "qwen2",
    tie_word_embeddings: bool = False,
) -> PretrainedConfig:
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_vit_config(
    kind: str = "clip", image_size: int = 28, patch_size: int = 14, hidden_size: int = 32, layers: int = 2
) -> PretrainedConfig:
    cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[kind]
    return cls(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
    )


def tiny_ovis(
    vocab_size: int = 256,
    visual_vocab_size: int = 64,
    vit: str = "clip",
    image_size: int = 28,
    hidden_stride: int = 1,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    **llm_kwargs: object,
) -> Ovis:
    """A randomly initialised fp32 Ovis (hidden 64, 2 layers; ViT width 32, 2 blocks)."""
    torch.manual_seed(seed)
    llm_config = tiny_llm_config(vocab_size=vocab_size, **llm_kwargs)  # type: ignore[arg-type]
    llm_config._attn_implementation = attn_implementation
    config = OvisConfig(
        llm_config=llm_config,
        visual_tokenizer_config=VisualTokenizerConfig(
            backbone_config=tiny_vit_config(vit, image_size=image_size),
            vocab_size=visual_vocab_size,
            hidden_stride=hidden_stride,
        ),
        conversation_template="qwen",
    )
    model = Ovis(config)
    model.set_llm_attention(attn_implementation)
    model.init_weights()
    return model


def write_tiny_parts(
    directory: str | os.PathLike,
    vit: str = "clip",
    image_size: int = 28,
    seed: int = 0,
    tokenizer_dir: str | os.PathLike | None = None,
    initializer_range: float = 0.02,
) -> tuple[Path, Path]:
    """A tiny LLM directory (Qwen2 shapes, the real Qwen2.5 tokenizer unless `tokenizer_dir` names
    another) and a tiny ViT directory.

    The LLM's vocabulary covers the tokenizer's; its embeddings are tied to keep the files small.
    `initializer_range`: std of the LLM's weights; a random 32-wide LLM at the usual 0.02 gives nearly
    uniform logits whatever its input, so a frozen one passes the visual parts almost no gradient (the demo
    uses a larger value to let stage 1's loss move).
    """
    torch.manual_seed(seed)
    directory = Path(directory)
    llm_dir, vit_dir = directory / "llm", directory / "vit"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or bundled_qwen_tokenizer_dir())
    config = tiny_llm_config(vocab_size=len(tokenizer), hidden_size=32, tie_word_embeddings=True)
    config.initializer_range = initializer_range
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.eos_token_id = (
        im_end if im_end != tokenizer.unk_token_id and im_end is not None else tokenizer.eos_token_id
    )
    llm = AutoModelForCausalLM.from_config(config)
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    vit_model = AutoModel.from_config(tiny_vit_config(vit, image_size=image_size))
    vit_model.save_pretrained(vit_dir)
    mean, std = (CLIP_MEAN, CLIP_STD) if vit == "clip" else (HALF, HALF)
    OvisImageProcessor(image_size=image_size, image_mean=mean, image_std=std).save_pretrained(vit_dir)
    return llm_dir, vit_dir


def random_sub_sample(
    rng: np.random.Generator, n_text: int, n_images: int, vocab_size: int = 256, image_side: int = 28
) -> tuple[np.ndarray, np.ndarray, list[Image.Image]]:
    """(input_ids, labels, images) of a synthetic sample: images near the start, second half supervised."""
    tokens = list(rng.integers(1, vocab_size, n_text))
    for j in range(n_images):
        tokens.insert(1 + 2 * j, IMAGE_TOKEN_ID)
    ids = np.asarray(tokens, dtype=np.int32)
    supervised = (np.arange(len(ids)) >= len(ids) // 2) & (ids != IMAGE_TOKEN_ID)
    labels = np.where(supervised, ids, IGNORE_INDEX).astype(np.int32)
    images = []
    for _ in range(n_images):  # varied aspect ratios exercise the resize-and-pad path
        h, w = (int(x) for x in rng.integers(image_side // 2, 2 * image_side, 2))
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return ids, labels, images


def random_packed_record(
    rng: np.random.Generator, specs: list[tuple[int, int]], vocab_size: int = 256, image_side: int = 28
) -> dict:
    """A packed record in the pack stage's format from `(n_text_tokens, n_images)` per sub-sample."""
    subs = [random_sub_sample(rng, n, k, vocab_size, image_side) for n, k in specs]
    return {
        "input_ids": np.concatenate([s[0] for s in subs]),
        "labels": np.concatenate([s[1] for s in subs]),
        "lengths": np.asarray([len(s[0]) for s in subs], dtype=np.int32),
        "images": [im for s in subs for im in s[2]],
    }


def split_record(record: dict) -> list[dict]:
    """The sub-samples of a packed record as records of their own (to run each alone)."""
    out, start, image = [], 0, 0
    for n in record["lengths"].tolist():
        ids = record["input_ids"][start : start + n]
        k = int(np.count_nonzero(ids == IMAGE_TOKEN_ID))
        out.append(
            {
                "input_ids": ids,
                "labels": record["labels"][start : start + n],
                "lengths": np.asarray([n], dtype=np.int32),
                "images": record["images"][image : image + k],
            }
        )
        start, image = start + n, image + k
    return out
