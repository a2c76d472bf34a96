"""The trainer's configuration: a stage recipe's [train] and [model] sections, checked, with overrides.

Everything stage-specific comes from `pipelines/stageN.toml` (or `--recipe FILE`); `--set key=value`
overrides any of it (`train.lr=1e-5`, `model.visual_vocab_size=64`, `trainable=["all"]`). Unknown or
mistyped keys are errors naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ovis_data.recipes import StageRecipe, find_deepspeed

from ..constants import VISUAL_VOCAB_SIZE
from ..trainable import TRAINABLE_NAMES

# [train]: key -> (type, default); None default = required
TRAIN_KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "epochs": ((int, float), 1),
    "lr": (float, None),
    "lr_by_family": (dict, {}),
    "warmup_ratio": (float, 0.0),
    "schedule": (str, "cosine"),
    "weight_decay": (float, 0.0),
    "betas": (list, [0.9, 0.999]),
    "eps": (float, 1e-8),
    "grad_clip": (float, 1.0),
    "global_batch_samples": (int, None),
    "micro_batch_tokens": (int, 16384),  # tokens per micro-batch, images expanded
    "bf16": (bool, True),  # where the hardware has it; fp32 on CPU
    "gradient_checkpointing": (bool, True),
    "seed": (int, 0),
    "num_workers": (int, 2),
    "log_every": (int, 1),
    "save_every": (int, 500),
    "keep_checkpoints": (int, 3),
    "skip_bad_shards": (bool, False),
    "max_lost_fraction": (float, 0.01),  # skip_bad_shards: stop when more of an epoch's records are lost
    "max_steps": (int, 0),  # 0: the schedule's length from the data
    "eval_every": (int, 0),  # steps between val losses (0: only at the end); needs a packed val split
    "keep_best": (bool, False),  # RUN/stageN/model_best: the model with the lowest val loss
    "peak_tflops": (float, 0.0),  # per device, for MFU; 0: the table of known GPUs (ovis_model.train.flops)
    "memory_check": (bool, True),  # refuse a micro-batch budget estimated not to fit (train/memory.py)
    "log_samples": (bool, False),  # RUN/stageN/samples.jsonl: the keys of the samples each step consumed
}
MODEL_KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "init": (str, "previous"),  # "parts" (base LLM + base ViT) or "previous" (a stage's model directory)
    "re_init_layers": (int, 0),
    "visual_vocab_size": (int, VISUAL_VOCAB_SIZE),
    "attn_implementation": (str, "auto"),
}
SCHEDULES = ("cosine", "constant")
INITS = ("parts", "previous")


class ConfigError(ValueError):
    """A recipe or override that cannot be trained: names the key and the file."""


def _check_value(section: str, key: str, value: Any, spec: dict, where: str) -> Any:
    if key not in spec:
        raise ConfigError(f"{where}: unknown key {section}.{key} (valid: {', '.join(sorted(spec))})")
    kind = spec[key][0]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {section}.{key} = {value!r} is not a {_kind_name(kind)}")
    return value


def _check(section: str, values: dict, spec: dict, where: str) -> dict:
    out = {key: _check_value(section, key, value, spec, where) for key, value in values.items()}
    for key, (_, default) in spec.items():
        if key not in out:
            if default is None:
                raise ConfigError(f"{where}: {section}.{key} is required")
            out[key] = default
    return out


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with a TOML value (`1e-5`, `true`, `["all"]`); a bare word is a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.lr=1e-5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


@dataclass
class TrainConfig:
    """One stage's training settings after the recipe, the overrides and the checks."""

    stage: int
    recipe: str
    trainable: list[str]
    deepspeed: str  # path of the DeepSpeed config the recipe names
    capacity: int
    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def from_recipe(cls, recipe: StageRecipe, overrides: list[str] = ()) -> TrainConfig:
        where = str(recipe.path)
        train, model = dict(recipe.train), dict(recipe.model)
        top: dict[str, Any] = {"trainable": list(recipe.trainable), "deepspeed": recipe.deepspeed}
        set_by: dict[str, str] = {}  # what an override set is blamed on --set, not on the recipe
        for text in overrides:
            key, value = parse_override(text)
            section, _, name = key.partition(".")
            blame = set_by[key] = f"--set {text} (over {Path(where).name})"
            if section == "train" and name:
                train[name] = _check_value(section, name, value, TRAIN_KEYS, blame)
            elif section == "model" and name:
                model[name] = _check_value(section, name, value, MODEL_KEYS, blame)
            elif key in top:
                top[key] = value
            else:
                raise ConfigError(
                    f"--set {key}: unknown key (use train.KEY, model.KEY, trainable or deepspeed)"
                )
        train = _check("train", train, TRAIN_KEYS, where)
        model = _check("model", model, MODEL_KEYS, where)
        if train["schedule"] not in SCHEDULES:
            raise ConfigError(
                f"{set_by.get('train.schedule', where)}: train.schedule = {train['schedule']!r}; "
                f"valid: {', '.join(SCHEDULES)}"
            )
        if model["init"] not in INITS:
            raise ConfigError(
                f"{set_by.get('model.init', where)}: model.init = {model['init']!r}; "
                f"valid: {', '.join(INITS)}"
            )
        trainable = top["trainable"]
        at = set_by.get("trainable", where)
        if not isinstance(trainable, list) or not trainable:
            raise ConfigError(f"{at}: trainable must be a non-empty list of module names")
        unknown = [n for n in trainable if n not in TRAINABLE_NAMES]
        if unknown:
            raise ConfigError(
                f"{at}: trainable names unknown module(s) {unknown}; valid: {', '.join(TRAINABLE_NAMES)}"
            )
        ds_path = find_deepspeed(recipe.path, str(top["deepspeed"]))  # beside the recipe, else shipped
        if ds_path is None:
            raise ConfigError(
                f"{set_by.get('deepspeed', where)}: DeepSpeed config {top['deepspeed']!r} found neither "
                "beside the recipe nor shipped"
            )
        return cls(
            stage=recipe.stage,
            recipe=where,
            trainable=list(trainable),
            deepspeed=str(ds_path),
            capacity=recipe.max_length,
            train=train,
            model=model,
            overrides=list(overrides),
        )

    @property
    def micro_batch_tokens(self) -> int:
        return int(self.train["micro_batch_tokens"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


@dataclass(frozen=True)
class StepPlan:
    """How the global batch in samples becomes micro-batches and steps on this run."""

    grad_accum: int
    steps: int
    warmup_steps: int
    samples_per_micro_batch: float
    micro_batches_per_epoch: int

    def describe(self, global_samples: int, world: int) -> str:
        got = self.grad_accum * world * self.samples_per_micro_batch
        return (
            f"global batch {global_samples} samples -> {self.grad_accum} accumulation step(s) x "
            f"{world} rank(s) x ~{self.samples_per_micro_batch:.1f} samples per micro-batch = "
            f"~{got:.0f} samples per step; "
            f"{self.steps} steps ({self.warmup_steps} warmup)"
        )


def plan_steps(
    cfg: TrainConfig, micro_batches_per_epoch: int, samples_per_micro_batch: float, world: int
) -> StepPlan:
    """Accumulation steps from the recipe's global batch (in samples, as the original counted it) and the
    data's samples per micro-batch; the schedule's length from the epochs (or train.max_steps)."""
    want = cfg.train["global_batch_samples"] / max(samples_per_micro_batch * world, 1e-9)
    grad_accum = max(1, min(round(want), micro_batches_per_epoch))
    steps = math.floor(cfg.train["epochs"] * micro_batches_per_epoch / grad_accum)
    if cfg.train["max_steps"]:
        steps = int(cfg.train["max_steps"])
    if steps < 1:
        raise ConfigError(
            f"{cfg.recipe}: the data gives no full optimizer step ({micro_batches_per_epoch} micro-batches "
            f"per epoch, {grad_accum} per step)"
        )
    warmup = math.ceil(cfg.train["warmup_ratio"] * steps)
    return StepPlan(grad_accum, steps, warmup, samples_per_micro_batch, micro_batches_per_epoch)


def deepspeed_config(cfg: TrainConfig, grad_accum: int, world: int, lr: float, bf16: bool) -> dict:
    """The recipe's DeepSpeed config with every number concrete (no "auto"): batch sizes, clipping,
    precision and the optimizer (torch's AdamW: no JIT-compiled fused kernel)."""
    ds = json.loads(Path(cfg.deepspeed).read_text(encoding="utf-8"))
    ds.update(
        train_micro_batch_size_per_gpu=1,  # one token-budget micro-batch
        gradient_accumulation_steps=grad_accum,
        train_batch_size=grad_accum * world,
        gradient_clipping=float(cfg.train["grad_clip"]),
        steps_per_print=10**9,
    )
    ds["bf16"] = {"enabled": bool(bf16)}
    ds.pop("fp16", None)
    t = cfg.train
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": lr,
            "betas": list(t["betas"]),
            "eps": t["eps"],
            "weight_decay": t["weight_decay"],
            "torch_adam": True,
        },
    }
    bad = [k for k, v in _walk(ds) if v == "auto"]
    if bad:
        raise ConfigError(f'{cfg.deepspeed}: {", ".join(bad)} = "auto"; give DeepSpeed concrete numbers')
    return ds


def _walk(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _walk(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out
