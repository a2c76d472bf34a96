"""Opening a trained model folder for inference: a clear error for what is not one (checked before
transformers is imported, which takes seconds), then the model on its device."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .chat import ChatError


def load_for_chat(model_dir: str | Path, device: str | None = None, dtype: str | None = None):  # noqa: ANN201
    """An `Ovis` from a trained directory on `device` (default cuda if present) in `dtype` (bf16 on cuda)."""
    check_model_dir(Path(model_dir))  # before transformers' import, seconds of it
    from .modeling import Ovis

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = (
        getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    )
    model = Ovis.from_pretrained(model_dir, dtype=torch_dtype)
    return model.to(device).eval()


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def check_safetensors_only(model_dir: Path) -> None:
    """ValueError (one line) for a model folder whose weights are pickles: loading a pickle can run code,
    so model folders are safetensors only, and transformers' own refusal is a long traceback."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or any(model_dir.glob("*.safetensors")):
        return
    pickles = sorted(p for pattern in PICKLE_WEIGHTS for p in model_dir.glob(pattern))
    if pickles:
        raise ValueError(
            f"{pickles[0]}: weights in pickle format, which can carry code; this toolkit loads safetensors "
            "only: convert the folder (e.g. load it in transformers, save_pretrained(safe_serialization="
            "True)) where you trust its source"
        )


def check_model_dir(model_dir: Path) -> None:
    """A clear error for what is not an Ovis model folder, before transformers' own (a traceback listing
    every config class it knows)."""
    hint = "ovis-train writes one to RUN/stageN/model"
    if not model_dir.exists():
        raise ChatError(f"{model_dir}: no such folder")
    if not model_dir.is_dir():
        raise ChatError(f"{model_dir}: not a folder (a model folder holds config.json and the weights)")
    config = model_dir / "config.json"
    if not config.is_file():
        raise ChatError(f"{model_dir}: not a model folder (no config.json); {hint}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ChatError(f"{config}: unreadable model config ({e})") from e
    if model_type != "ovis":
        raise ChatError(
            f"{model_dir}: not an Ovis model (config.json says model_type {model_type!r}; a base LLM or ViT "
            f"is an input of ovis-train --stage 1, not a chat model); {hint}"
        )
    try:
        check_safetensors_only(model_dir)
    except ValueError as e:
        raise ChatError(str(e)) from e
