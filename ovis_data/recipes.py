"""Recipes: which datasets a stage uses, its lengths and its training setup.

The shipped ones are pipelines/stageN.toml (`--stage N`); a user's own is any file of the same keys
(`--recipe FILE`), its datasets resolved against the shipped registry extended by `--dataset-info FILE`.
Its `stage` is the number it packs and trains as (OUT/stageN, RUN/stageN, starting from RUN/stage{N-1}).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import IMAGE_MARK
from .errors import OvisDataError
from .registry import DatasetSpec, load_registry, recipe_registry, select
from .resources import resource_path

TEMPLATES = ("auto", "qwen", "llama3", "gemma", "chat_template")
DEFAULT_VISUAL_TOKENS = 578  # 576 patches + image begin/end of CLIP ViT-L/14-336 (docs/stages.md)
DEFAULT_IMAGE_SIZE = 336
# a typo in a recipe must be an error, not a silently ignored key ([model] and [train] keys: the trainer's)
TOP_KEYS = (
    "stage", "template", "max_length", "image_size", "visual_tokens", "max_images_per_pack", "trainable",
    "deepspeed", "model", "train", "datasets",
)  # fmt: skip
DATASET_KEYS = ("name", "weight", "caption_template")


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
        found = find_deepspeed(self.path, self.deepspeed)
        return found if found is not None else self.path.parent / self.deepspeed


def _fail(path: Path, reason: str) -> OvisDataError:
    return OvisDataError(f"{path}: {reason}")


def _positive_int(path: Path, raw: dict, key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(path, f"{key} must be a positive integer, got {value!r}")
    return value


def recipe_path(stage: int) -> Path:
    return resource_path("pipelines") / f"stage{stage}.toml"


def find_deepspeed(recipe_file: Path, name: str) -> Path | None:
    """The DeepSpeed config a recipe names: beside the recipe, else the shipped one of that name."""
    for candidate in (Path(recipe_file).parent / name, resource_path("pipelines") / name):
        if candidate.is_file():
            return candidate
    return None


def no_shipped_recipe(stage: int) -> OvisDataError:
    """What every command says for a --stage N that has no pipelines/stageN.toml (one wording everywhere)."""
    return OvisDataError(f"no shipped recipe for stage {stage} (stages 1-3; your own: --recipe FILE)")


def select_specs(
    names: list[str] | None,
    stage: int | None,
    recipe: str | Path | None,
    dataset_info: str | Path | None,
    verb: str,
) -> tuple[list[DatasetSpec], dict[str, DatasetSpec]]:
    """The datasets a command works on, and the registry they come from: those a recipe names
    (`--recipe`, alone), or NAMES..., or every dataset, narrowed to the registry's stage N by `--stage N`.
    `verb` says what the command does to them, for the error when --recipe is combined with the others."""
    if recipe is not None:
        if names or stage is not None:
            raise OvisDataError(f"--recipe {verb} the datasets it names: give no names or --stage")
        chosen, registry = select_recipe(None, recipe, dataset_info)
        return [registry[m.name] for m in chosen.datasets], registry
    registry = load_registry(dataset_info)
    specs = select(registry, names)
    if stage is not None:
        if stage not in {s.stage for s in registry.values()}:  # a usage error, not an empty success
            raise no_shipped_recipe(stage)
        specs = [s for s in specs if s.stage == stage]
    return specs, registry


def select_recipe(
    stage: int | None, recipe: str | Path | None, dataset_info: str | Path | None = None
) -> tuple[StageRecipe, dict[str, DatasetSpec]]:
    """`--stage N` (the shipped pipelines/stageN.toml) or `--recipe FILE`, exactly one; its datasets
    resolved against the shipped registry extended by `--dataset-info FILE`. Returns it with that registry."""
    if stage is not None and recipe is not None:
        raise OvisDataError("--stage and --recipe exclude each other: --stage N is the shipped recipe")
    if stage is None and recipe is None:
        raise OvisDataError("give --stage N (the shipped recipe pipelines/stageN.toml) or --recipe FILE")
    registry = recipe_registry(dataset_info)
    if recipe is None and not recipe_path(int(stage)).is_file():
        raise no_shipped_recipe(int(stage))
    return load_recipe(int(stage) if recipe is None else Path(recipe), registry), registry


def _mix(path: Path, i: int, d: object, registry: dict[str, DatasetSpec]) -> DatasetMix:
    where = f"datasets[{i}]"
    if not isinstance(d, dict):
        raise _fail(path, f"{where}: must be a table ([[datasets]] with name = ...)")
    unknown = sorted(set(d) - set(DATASET_KEYS))
    if unknown:
        raise _fail(path, f"{where}: unknown key(s) {unknown}; valid: {', '.join(DATASET_KEYS)}")
    name = d.get("name")
    if name not in registry:
        raise _fail(
            path,
            f"{where}: unknown dataset {name!r} (not in the registry: register it in your "
            "dataset_info.json and pass --dataset-info FILE)",
        )
    where = f"{where} ({name})"
    weight = d.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
        raise _fail(path, f"{where}: weight must be a number > 0, got {weight!r}")
    template = d.get("caption_template")
    if template is not None:
        if registry[name].data_format != "caption":
            raise _fail(path, f"{where}: caption_template only applies to caption datasets")
        if not isinstance(template, str) or template.count(IMAGE_MARK) != 1:
            raise _fail(path, f"{where}: caption_template must contain exactly one '{IMAGE_MARK}'")
    return DatasetMix(name, float(weight), template)


def load_recipe(stage_or_path: int | str | Path, registry: dict[str, DatasetSpec]) -> StageRecipe:
    """Parse a recipe (a shipped stage's number, or a file) and check every dataset it names against the
    registry. Errors name the file, the entry and the reason."""
    path = recipe_path(stage_or_path) if isinstance(stage_or_path, int) else Path(stage_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise _fail(path, "recipe not found") from e
    except IsADirectoryError as e:
        raise _fail(path, "is a directory, not a recipe file") from e
    except tomllib.TOMLDecodeError as e:
        raise _fail(path, f"malformed TOML: {e}") from e
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:  # first: a misspelt required key is reported as the typo it is
        raise _fail(path, f"unknown key(s) {unknown}; valid: {', '.join(TOP_KEYS)}")
    for key in ("stage", "max_length", "trainable", "datasets", "train"):
        if key not in raw:
            raise _fail(path, f"missing required key {key!r}")
    template = raw.get("template", "auto")
    if template not in TEMPLATES:
        raise _fail(path, f"template must be one of {list(TEMPLATES)}, got {template!r}")
    if not isinstance(raw["datasets"], list) or not raw["datasets"]:
        raise _fail(path, "datasets must be a non-empty list of [[datasets]] tables")
    mixes = [_mix(path, i, d, registry) for i, d in enumerate(raw["datasets"])]
    seen: set[str] = set()
    for i, m in enumerate(mixes):
        if m.name in seen:
            raise _fail(path, f"datasets[{i}] ({m.name}): listed twice (give one entry a weight instead)")
        seen.add(m.name)
    trainable = raw["trainable"]
    if not isinstance(trainable, list) or not all(isinstance(t, str) for t in trainable):
        raise _fail(path, f"trainable must be a list of module names, got {trainable!r}")
    for section in ("train", "model"):
        if not isinstance(raw.get(section, {}), dict):
            raise _fail(path, f"{section} must be a table ([{section}])")
    if "lr" not in raw["train"]:
        raise _fail(path, "train.lr is required")
    deepspeed = raw.get("deepspeed", "zero2.json")
    if not isinstance(deepspeed, str) or find_deepspeed(path, deepspeed) is None:
        raise _fail(path, f"DeepSpeed config {deepspeed!r} found neither beside the recipe nor shipped")
    return StageRecipe(
        stage=_positive_int(path, raw, "stage", 0),
        path=path,
        datasets=tuple(mixes),
        template=template,
        max_length=_positive_int(path, raw, "max_length", 0),
        image_size=_positive_int(path, raw, "image_size", DEFAULT_IMAGE_SIZE),
        max_images_per_pack=_positive_int(path, raw, "max_images_per_pack", 32),
        trainable=tuple(trainable),
        deepspeed=deepspeed,
        model=dict(raw.get("model", {})),
        train=dict(raw["train"]),
        visual_tokens=_positive_int(path, raw, "visual_tokens", DEFAULT_VISUAL_TOKENS),
    )


def describe_recipe(recipe: StageRecipe) -> list[tuple[str, str]]:
    """What a recipe makes `ovis-data pack` and `ovis-train` use, as (what, value) lines."""
    n = recipe.stage
    ds = recipe.deepspeed_path()
    where = "beside the recipe" if ds.parent == recipe.path.parent else "shipped"
    init = recipe.model.get("init", "previous")
    start = (
        "a base LLM and ViT (--llm, --vit)"
        if init == "parts"
        else f"a model folder (--init DIR, default RUN/stage{n - 1}/model)"
    )
    return [
        ("recipe", str(recipe.path)),
        ("stage", f"{n}: packs into OUT/stage{n}, trains into RUN/stage{n}"),
        ("starts from", start),
        ("trainable", ", ".join(recipe.trainable)),
        ("chat template", recipe.template),
        ("max length", f"{recipe.max_length} tokens per packed sequence"),
        ("images", f"{recipe.image_size} px longer side, {recipe.visual_tokens} visual tokens each, "
                   f"at most {recipe.max_images_per_pack} per sequence"),
        ("DeepSpeed", f"{ds} ({where})"),
        ("train", ", ".join(f"{k}={v}" for k, v in recipe.train.items())),
    ]  # fmt: skip
