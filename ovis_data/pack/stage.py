"""`ovis-data pack`: a stage's catalogs -> templates and tokens -> packs -> shards + manifest.

Three phases, each resumable and each a pure function of its inputs (so any number of processes gives
the same bytes):
1. tokenize: one unit per (dataset, catalog row group), written to OUT/stageN/.work/tok/ as an Arrow
   file of per-sample tokens, supervised mask and provenance;
2. plan (one process, arrays only, `plan.plan_stage`): drop by reason, apply mixture weights, packing;
3. write: one unit per shard of `packs_per_shard` packs; images read through the image store, resized,
   stored as JPEG. A shard is renamed into place when complete; the manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace
from numbers import Integral
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OvisDataError
from ..imagestore import INDEX_SCHEMA, index_file, is_shard_dir
from ..recipes import StageRecipe, load_recipe
from ..registry import DEFAULT_CAPTION_TEMPLATE, DatasetSpec, load_registry, resolve_root
from ..shardformat import FORMAT, MANIFEST, SHARD_KEYS, VAL_DIR, manifest_is_current, shard_index, shard_name
from ..storage import RemotePath, is_url, staging_dir
from .dispatch import Progress, run_tasks
from .holdout import check_fraction
from .manifest import build_manifest
from .packing import DEFAULT_BUFFER
from .plan import StagePlan, plan_stage, val_plan
from .templates import detect_chat_format
from .tokenize import load_tokenizer, tokenizer_identity, vocab_identity
from .worker import WORK, PackConfig, PackWorker, Unit, atomic_json, mapped_index_path

PACKS_PER_SHARD = 1000


def pack_stage(
    stage: int | str | Path | StageRecipe,
    root: str | Path | None,
    tokenizer: str | Path,
    out: str | Path,
    *,
    max_length: int | None = None,
    seed: int = 0,
    processes: int | None = None,
    visual_tokens: int | None = None,
    image_size: int | None = None,
    packs_per_shard: int = PACKS_PER_SHARD,
    buffer_size: int = DEFAULT_BUFFER,
    overwrite: bool = False,
    registry: dict[str, DatasetSpec] | None = None,
    progress: Progress | None = None,
    ray: str | None = None,
    holdout: float = 0.0,
) -> dict:
    """Pack one stage into OUT/stageN/ and return its manifest. Resumes a killed run with the same
    inputs; refuses (unless overwrite) to mix with shards packed from other inputs. `max_length`,
    `visual_tokens` and `image_size` default (None) to the recipe's; `holdout`: the share of each
    dataset's selected samples packed into OUT/stageN/val/ instead (ovis_data.pack.holdout)."""
    registry = registry or load_registry()
    if isinstance(stage, StageRecipe):  # already loaded (and checked) against this registry
        recipe = stage
    else:
        recipe = load_recipe(int(stage) if str(stage).isdigit() else Path(stage), registry)
    for flag, value in (("visual_tokens", visual_tokens), ("image_size", image_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value <= 0):
            raise OvisDataError(f"{flag} must be a positive integer, got {value!r}")
    holdout = check_fraction(holdout)
    root_path = resolve_root(root)
    remote_out = RemotePath(str(out)) / f"stage{recipe.stage}" if is_url(out) else None
    tok_path = Path(tokenizer)
    tok = load_tokenizer(tok_path)
    cfg = _settings(
        recipe,
        registry,
        tok,
        tok_path,
        root_path,
        out_dir=staging_dir("pack", remote_out) if remote_out else Path(out) / f"stage{recipe.stage}",
        remote_out=remote_out,
        max_length=max_length,
        visual_tokens=visual_tokens,
        image_size=image_size,
        seed=seed,
        packs_per_shard=packs_per_shard,
        buffer_size=buffer_size,
    )
    if ray is not None and remote_out is not None:  # Ray tasks on other nodes read the work files
        raise OvisDataError(
            f"--ray packs into a folder every node sees (a shared file system), not {remote_out}: "
            "drop --ray (workers on this machine) or pack to shared storage and copy the stage"
        )
    if remote_out is not None:
        _pull_state(remote_out, Path(cfg.out))
    catalogs = _catalogs(recipe, registry, root_path, processes)
    caption_templates = {
        m.name: m.caption_template or registry[m.name].caption_template or DEFAULT_CAPTION_TEMPLATE
        for m in recipe.datasets
        if registry[m.name].data_format == "caption"
    }
    # the vocabulary as loaded, which is what tokenized: transformers may add tokens the files lack
    # (a Qwen2 LLM folder's tokenizer gains <|endoftext|>), and the trainer compares the loaded one too
    identity = tokenizer_identity(tok_path, vocab_sha256=vocab_identity(tok))
    inputs = _inputs(cfg, recipe, identity["sha256"], catalogs, caption_templates)
    if holdout:  # only then: a stage packed without one keeps its inputs' hash
        inputs["holdout"] = holdout
    inputs_sha = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    finished = _start(cfg, remote_out, inputs, inputs_sha, overwrite)
    if finished is not None:
        return finished

    backend_json = tok.backend_tokenizer.to_str()
    units = _tokenize(
        cfg, recipe, registry, catalogs, caption_templates, backend_json, processes, progress, ray
    )
    plan = plan_stage(cfg, recipe, units, holdout)
    shards = _write_shards(cfg, units, plan, backend_json, remote_out, processes, progress, ray)
    if plan.val is not None:  # before the stage's manifest, which says the stage (val split too) is complete
        vcfg = _val_settings(cfg)
        vshards = _write_shards(
            vcfg, units, val_plan(cfg, plan), backend_json, None, processes, progress, ray
        )
        vmanifest = build_manifest(
            vcfg, recipe, identity, inputs_sha, caption_templates, plan.val.datasets, vshards
        )
        _publish(vcfg, {**vmanifest, "split": VAL_DIR}, remote_out / VAL_DIR if remote_out else None)
    manifest = build_manifest(cfg, recipe, identity, inputs_sha, caption_templates, plan.datasets, shards)
    _publish(cfg, manifest, remote_out)
    return manifest


# -- settings and inputs ---------------------------------------------------------------------------------
def _settings(
    recipe: StageRecipe,
    registry: dict[str, DatasetSpec],
    tok,
    tok_path: Path,
    root: Path,
    *,
    out_dir: Path,
    remote_out: RemotePath | None,
    max_length: int | None,
    visual_tokens: int | None,
    image_size: int | None,
    seed: int,
    packs_per_shard: int,
    buffer_size: int,
) -> PackConfig:
    """The run's settings: the recipe's, where an option is None."""
    cfg = PackConfig(
        stage=recipe.stage,
        root=str(root),
        out=str(out_dir),
        tokenizer_path=str(tok_path),
        chat_format=_chat_format(recipe, registry, tok),
        capacity=int(max_length or recipe.max_length),
        visual_tokens=int(visual_tokens if visual_tokens is not None else recipe.visual_tokens),
        image_size=int(image_size if image_size is not None else recipe.image_size),
        max_images=recipe.max_images_per_pack,
        seed=int(seed),
        image_dirs={s.name: _image_dir(s, root) for s in _specs(recipe, registry)},
        packs_per_shard=int(packs_per_shard),
        buffer_size=int(buffer_size),
        publish=str(remote_out) if remote_out else None,
    )
    if cfg.capacity < cfg.visual_tokens:
        raise OvisDataError(f"max length {cfg.capacity} cannot hold one image ({cfg.visual_tokens} tokens)")
    return cfg


def _specs(recipe: StageRecipe, registry: dict[str, DatasetSpec]) -> list[DatasetSpec]:
    return [registry[m.name] for m in recipe.datasets]


def _image_dir(spec: DatasetSpec, root: Path) -> str | None:
    return str(spec.image_path(root)) if spec.image_dir else None


def _chat_format(recipe: StageRecipe, registry: dict[str, DatasetSpec], tok) -> str | None:
    """The recipe's chat format as the tokenizer can express it; None for a caption-only stage."""
    if any(s.data_format == "conversation" for s in _specs(recipe, registry)):
        return detect_chat_format(tok, recipe.template).name
    return None


def _catalogs(
    recipe: StageRecipe, registry: dict[str, DatasetSpec], root: Path, processes: int | None
) -> dict:
    """Catalog paths of the recipe's datasets, validated first where one is missing; an object store's
    catalog is copied here (workers read it by row group)."""
    from ..validate.dataset import ensure_catalog  # DuckDB: imported by the main process only

    paths = {}
    for mix in recipe.datasets:
        path = ensure_catalog(registry[mix.name], root, processes)
        if isinstance(path, RemotePath):
            local = staging_dir("catalogs", path.parent) / path.name
            path.get_file(local)
            path = local
        paths[mix.name] = path
    return paths


def _inputs(cfg: PackConfig, recipe: StageRecipe, tokenizer_sha: str, catalogs: dict, captions: dict) -> dict:
    """Everything the shards' bytes depend on (the run resumes only when these are the same)."""
    ignored = ("root", "out", "tokenizer_path", "image_dirs", "publish")
    return {
        "format": FORMAT,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ignored},
        "tokenizer_sha256": tokenizer_sha,
        "datasets": [
            {"name": m.name, "weight": m.weight, "catalog_sha256": _file_sha256(catalogs[m.name])}
            for m in recipe.datasets
        ],
        "caption_templates": captions,
    }


def _start(
    cfg: PackConfig, remote_out: RemotePath | None, inputs: dict, inputs_sha: str, overwrite: bool
) -> dict | None:
    """Resume, start afresh or refuse, from what OUT/stageN holds: returns the manifest when the stage is
    already packed from these inputs, else records the inputs and returns None."""
    out_dir = Path(cfg.out)
    manifest_path = out_dir / MANIFEST
    params_path = out_dir / WORK / "inputs.json"
    previous = None
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text(encoding="utf-8")).get("inputs_sha256")
    elif params_path.exists():
        previous = json.loads(params_path.read_text(encoding="utf-8")).get("inputs_sha256")
    if previous is not None and previous != inputs_sha:
        if not overwrite:
            raise OvisDataError(
                f"{remote_out or out_dir} holds shards packed from other inputs (recipe, catalogs, tokenizer "
                "or options changed): use another --out, or --overwrite to replace them"
            )
        shutil.rmtree(out_dir)
        if remote_out is not None:
            remote_out.fs.rm(remote_out.path, recursive=True)
    elif previous == inputs_sha and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest_is_current(manifest):
            return manifest
        # Else written by an older version (same shards, fewer keys): shards are rewritten to the same
        # bytes, their stats gaining the keys.
    (out_dir / WORK / "tok").mkdir(parents=True, exist_ok=True)
    atomic_json(params_path, {"inputs_sha256": inputs_sha, **inputs})
    if remote_out is not None:
        (remote_out / WORK / "inputs.json").put_file(params_path)
    return None


# -- phase 1: tokenize ---------------------------------------------------------------------------------
def _tokenize(
    cfg: PackConfig,
    recipe: StageRecipe,
    registry: dict[str, DatasetSpec],
    catalogs: dict,
    caption_templates: dict,
    backend_json: str,
    processes: int | None,
    progress: Progress | None,
    ray: str | None,
) -> list[Unit]:
    """Every unit of the stage (one per dataset and catalog row group), tokenizing those not done yet."""
    units: list[Unit] = []
    for m in recipe.datasets:
        spec = registry[m.name]
        for g in range(pq.ParquetFile(catalogs[m.name]).num_row_groups):
            units.append(
                Unit(
                    dataset=m.name,
                    data_format=spec.data_format,
                    catalog=str(catalogs[m.name]),
                    row_group=g,
                    caption_template=caption_templates.get(m.name),
                    path=str(Path(cfg.out) / WORK / "tok" / f"{m.name}-{g:05d}.arrow"),
                )
            )
    todo = [(u,) for u in units if not Path(u.path).exists()]
    rows = [pq.ParquetFile(u.catalog).metadata.row_group(u.row_group).num_rows for (u,) in todo]
    tok_init = (cfg, backend_json, None, None)
    run_tasks(PackWorker.tokenize_unit, todo, processes, tok_init, "tokenize", progress, rows, ray=ray)
    return units


# -- phase 3: write --------------------------------------------------------------------------------------
def _write_shards(
    cfg: PackConfig,
    units: list[Unit],
    plan: StagePlan,
    backend_json: str,
    remote_out: RemotePath | None,
    processes: int | None,
    progress: Progress | None,
    ray: str | None,
) -> list[dict]:
    """Every shard's stats, in order, writing the shards not done yet."""
    out_dir = Path(cfg.out)
    _map_indexes(cfg)
    n_shards = -(-plan.n_packs // cfg.packs_per_shard)
    tasks = []
    done_stats = {}
    for s in range(n_shards):
        stats_path = out_dir / WORK / "shards" / f"{s:05d}.json"
        # (with object storage the local stats exist only once the tar is there: see PackWorker.write_shard)
        if (remote_out is not None or (out_dir / shard_name(cfg.stage, s)).exists()) and stats_path.exists():
            st = json.loads(stats_path.read_text(encoding="utf-8"))
            # else not finished, or stats of an older version (drops not yet counted per dataset)
            if all(k in st for k in SHARD_KEYS) and all(isinstance(v, dict) for v in st["dropped"].values()):
                done_stats[s] = st
                continue
        tasks.append((s, *plan.shard_packs(s, cfg.packs_per_shard)))
    init = (cfg, backend_json, units, plan.bases)
    weights = [len(t[1]) for t in tasks]
    for st in run_tasks(PackWorker.write_shard, tasks, processes, init, "write", progress, weights, ray=ray):
        done_stats[shard_index(st["name"])] = st
    return [done_stats[s] for s in range(n_shards)]


def _publish(cfg: PackConfig, manifest: dict, remote_out: RemotePath | None) -> None:
    """The manifest, last: the stage is complete when it is there; the tokenized units go."""
    out_dir = Path(cfg.out)
    atomic_json(out_dir / MANIFEST, manifest)
    if remote_out is not None:
        (remote_out / MANIFEST).put_file(out_dir / MANIFEST)
    shutil.rmtree(out_dir / WORK / "tok", ignore_errors=True)


def _val_settings(cfg: PackConfig) -> PackConfig:
    """The held-out split's settings: the stage's, written into OUT/stageN/val/. Its shard writers read the
    training split's mapped image indexes (hard links: no second sort of a 10M-row index)."""
    vcfg = replace(
        cfg, out=str(Path(cfg.out) / VAL_DIR), publish=f"{cfg.publish}/{VAL_DIR}" if cfg.publish else None
    )
    Path(vcfg.out).mkdir(parents=True, exist_ok=True)
    for dataset in cfg.image_dirs:
        src, dst = mapped_index_path(cfg, dataset), mapped_index_path(vcfg, dataset)
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return vcfg


def _pull_state(remote: RemotePath, local: Path) -> None:
    """Make the local staging folder's bookkeeping (manifest, inputs, finished shards' stats) that of the
    object store, which is the truth: what another machine finished counts, a shard gone there does not."""
    for stale in [local / MANIFEST, local / WORK / "inputs.json", *(local / WORK / "shards").glob("*.json")]:
        stale.unlink(missing_ok=True)
    stats = (remote / WORK / "shards").glob("*.json")
    for path in [remote / MANIFEST, remote / WORK / "inputs.json", *stats]:
        if path.exists():
            rel = path.url[len(remote.url) + 1 :]
            path.get_file(local / rel)


def _map_indexes(cfg: PackConfig) -> None:
    """For each local shards store, its index as load_index orders it (by image_path, then as stored),
    saved as an Arrow file that the shard writers read by pread: a 10M-image index is read and sorted once,
    by DuckDB under its memory limit, instead of loaded and sorted in every worker. Rewritten each run
    (the store may have changed); object stores keep load_index in each worker."""
    from ..duck import bounded_connection  # DuckDB: imported by the main process only

    for dataset, image_dir in cfg.image_dirs.items():
        if image_dir is None or "://" in image_dir or not is_shard_dir(Path(image_dir)):
            continue
        index = index_file(Path(image_dir))
        dest = mapped_index_path(cfg, dataset)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        source = str(index).replace("'", "''")
        with bounded_connection() as con:
            reader = con.sql(
                'SELECT image_path, tar, "offset", size FROM read_parquet(\'' + source + "', "
                "file_row_number = true) ORDER BY image_path, file_row_number"
            ).to_arrow_reader(65536)
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, INDEX_SCHEMA) as writer:
                for batch in reader:
                    writer.write_batch(batch.cast(INDEX_SCHEMA))
        os.replace(tmp, dest)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
