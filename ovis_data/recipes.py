"""Stage recipes (pipelines/stageN.toml): which datasets a stage uses, its lengths and training setup."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OvisDataError
from .registry import DatasetSpec
from .resources import resource_path

TEMPLATES = ("auto", "qwen", "llama3", "gemma", "chat_template")
DEFAULT_VISUAL_TOKENS = 578  # 576 patches + image begin/end of CLIP ViT-L/14-336 (OVIS_V1 section 4)
DEFAULT_IMAGE_SIZE = 336


@dataclass(frozen=True)
class DatasetMix:
    name: str
    weight: float = 1.0  # 1.0: every sample once; >1 repeats, <1 subsamples (seeded)
    caption_template: str | None = None


@dataclass(frozen=True)
class StageRecipe:
    stage: int
    path: Path
    datasets: tuple[DatasetMix, ...]
    template: str
    max_length: int
    image_size: int  # longer side of the images stored in packed shards
    max_images_per_pack: int
    trainable: tuple[str, ...]
    deepspeed: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    visual_tokens: int = DEFAULT_VISUAL_TOKENS  # per image; must equal the model's num_visual_tokens

    def lr_for(self, family: str | None) -> float:
        """Learning rate, with a per-LLM-family override (stage 3 used 1e-5 for Llama 3)."""
        by_family = self.train.get("lr_by_family", {})
        return float(by_family.get(family, self.train["lr"])) if family else float(self.train["lr"])

    def deepspeed_path(self) -> Path:
        return self.path.parent / self.deepspeed


def _fail(path: Path, reason: str) -> OvisDataError:
    return OvisDataError(f"{path}: {reason}")


def _positive_int(path: Path, raw: dict, key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(path, f"{key} must be a positive integer, got {value!r}")
    return value


def recipe_path(stage: int) -> Path:
    return resource_path("pipelines") / f"stage{stage}.toml"


def load_recipe(stage_or_path: int | str | Path, registry: dict[str, DatasetSpec]) -> StageRecipe:
    """Parse a stage recipe and check every dataset it names against the registry."""
    path = recipe_path(stage_or_path) if isinstance(stage_or_path, int) else Path(stage_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise _fail(path, "recipe not found") from e
    except tomllib.TOMLDecodeError as e:
        raise _fail(path, f"malformed TOML: {e}") from e
    for key in ("stage", "max_length", "trainable", "datasets", "train"):
        if key not in raw:
            raise _fail(path, f"missing required key {key!r}")
    template = raw.get("template", "auto")
    if template not in TEMPLATES:
        raise _fail(path, f"template must be one of {list(TEMPLATES)}, got {template!r}")
    mixes = []
    for i, d in enumerate(raw["datasets"]):
        name = d.get("name")
        if name not in registry:
            raise _fail(path, f"datasets[{i}]: unknown dataset {name!r} (not in the registry)")
        weight = float(d.get("weight", 1.0))
        if weight <= 0:
            raise _fail(path, f"datasets[{i}] ({name}): weight must be > 0")
        mixes.append(DatasetMix(name, weight, d.get("caption_template")))
    if "lr" not in raw["train"]:
        raise _fail(path, "train.lr is required")
    deepspeed = raw.get("deepspeed", "zero2.json")
    if not (path.parent / deepspeed).exists():
        raise _fail(path, f"DeepSpeed config {deepspeed!r} not found beside the recipe")
    return StageRecipe(
        stage=int(raw["stage"]),
        path=path,
        datasets=tuple(mixes),
        template=template,
        max_length=int(raw["max_length"]),
        image_size=_positive_int(path, raw, "image_size", DEFAULT_IMAGE_SIZE),
        max_images_per_pack=int(raw.get("max_images_per_pack", 32)),
        trainable=tuple(raw["trainable"]),
        deepspeed=deepspeed,
        model=dict(raw.get("model", {})),
        train=dict(raw["train"]),
        visual_tokens=_positive_int(path, raw, "visual_tokens", DEFAULT_VISUAL_TOKENS),
    )
