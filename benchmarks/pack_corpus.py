"""Samples for the pack benchmarks: the demo corpus's stage-3 mix scaled up, its captions, and a
LLaVA-665k-like length distribution. Deterministic for a seed; no files written."""

from __future__ import annotations

import random

import numpy as np

from ovis_data import demo_corpus
from ovis_data.pack.tokenize import bundled_qwen_tokenizer_dir
from ovis_data.registry import load_registry

VISUAL_TOKENS = 578


def qwen_path() -> str:
    return str(bundled_qwen_tokenizer_dir())


def stage3_conversations(n: int, seed: int = 0) -> list[dict]:
    """Conversation samples shaped as the demo corpus shapes them, spread evenly over the 12 stage-3
    datasets (text only for allava-evol-instruct, one or two images otherwise), LLaVA-style dicts."""
    rng = random.Random(seed)
    specs = [s for s in load_registry().values() if s.stage == 3]
    out = []
    for i in range(n):
        spec = specs[i % len(specs)]
        if spec.image_dir is None:
            conv = demo_corpus.random_conversation(rng, 0, rng.randint(1, 3), i % 4 == 0, i % 5 == 0)
            out.append({"id": f"{spec.name}-{i}", "conversations": conv})
            continue
        n_images = 2 if i % 7 == 3 else 1
        conv = demo_corpus.random_conversation(rng, n_images, rng.randint(1, 4), i % 6 == 0, i % 5 == 0)
        out.append(
            {
                "id": f"{spec.name}-{i}",
                "image": [f"img_{i}_{k}.jpg" for k in range(n_images)],
                "conversations": conv,
            }
        )
    return out


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [demo_corpus.random_sentence(rng) + ("" if i % 9 else " <image> watermark") for i in range(n)]


def llava665k_lengths(n: int = 665_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True lengths (text + 577 per image) following the make-up of llava_v1_5_mix665k: VQA-style
    multi-question samples, OCR-VQA, TextCaps, region grounding, LLaVA-Instruct and text-only ShareGPT,
    with log-normal text lengths around each source's typical size."""
    rng = np.random.default_rng(seed)
    # share, median text tokens, sigma, images
    sources = [
        (0.25, 180, 0.6, 1),  # VQAv2 / GQA / OKVQA (several questions merged per image)
        (0.12, 120, 0.5, 1),  # OCR-VQA
        (0.03, 60, 0.4, 1),  # TextCaps
        (0.20, 280, 0.5, 1),  # RefCOCO / Visual Genome
        (0.24, 320, 0.7, 1),  # LLaVA-Instruct-158k
        (0.06, 700, 0.9, 0),  # ShareGPT (text only)
    ]
    shares = np.array([s[0] for s in sources])
    which = rng.choice(len(sources), size=n, p=shares / shares.sum())
    med = np.array([s[1] for s in sources])[which]
    sig = np.array([s[2] for s in sources])[which]
    images = np.array([s[3] for s in sources])[which]
    text = np.maximum(8, (med * np.exp(rng.normal(0, 1, n) * sig)).astype(np.int64))
    return text + (VISUAL_TOKENS - 1) * images, images
