"""`ovis-data pack`: a stage's catalogs -> templates and tokens -> packs -> shards + manifest.

Three phases, each resumable and each a pure function of its inputs (so any number of processes gives
the same bytes):
1. tokenize: one unit per (dataset, catalog row group), written to OUT/stageN/.work/tok/ as an Arrow
   file of per-sample tokens, supervised mask and provenance;
2. plan (one process, arrays only): drop by reason, apply mixture weights, packing (`packing.pack_lengths`);
3. write: one unit per shard of `packs_per_shard` packs; images read through the image store, resized,
   stored as JPEG. A shard is renamed into place when complete; the manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zlib
from dataclasses import asdict
from numbers import Integral
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import OvisDataError
from ..imagestore import INDEX_SCHEMA, index_file, is_shard_dir
from ..recipes import StageRecipe, load_recipe
from ..registry import DEFAULT_CAPTION_TEMPLATE, DatasetSpec, load_registry, resolve_root
from ..storage import RemotePath, is_url, staging_dir
from ..validate.catalog import catalog_path, check_catalog_current
from .dispatch import Progress, _run
from .holdout import ValSelection, check_fraction, holdout_mask, split_selection, write_val_split
from .manifest import FORMAT, MANIFEST, SHARD_KEYS, _manifest, _manifest_is_current
from .packing import DEFAULT_BUFFER, pack_lengths
from .templates import detect_chat_format
from .tokenize import load_tokenizer, tokenizer_identity, vocab_identity
from .worker import WORK, PackConfig, PackWorker, Unit, _atomic_json, _mapped_index_path, shard_name

PACKS_PER_SHARD = 1000


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
    saved as an Arrow file that the shard writers memory-map: a 10M-image index is read and sorted once,
    by DuckDB under its memory limit, instead of loaded and sorted in every worker. Rewritten each run
    (the store may have changed); object stores keep load_index in each worker."""
    from ..validate.dataset import bounded_connection  # DuckDB: imported by the main process only

    for dataset, image_dir in cfg.image_dirs.items():
        if image_dir is None or "://" in image_dir or not is_shard_dir(Path(image_dir)):
            continue
        index = index_file(Path(image_dir))
        dest = _mapped_index_path(cfg, dataset)
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


def _ensure_catalogs(recipe: StageRecipe, registry: dict[str, DatasetSpec], root: Path, processes: int):
    """Catalog paths of the recipe's datasets, running validation first where one is missing."""
    paths = {}
    for mix in recipe.datasets:
        path = catalog_path(root, mix.name)
        if not path.exists():
            from ..validate.dataset import validate_dataset

            result = validate_dataset(registry[mix.name], root, processes=processes)
            if result.error:
                raise OvisDataError(f"{mix.name}: cannot validate before packing: {result.error}")
            if not path.exists():
                raise OvisDataError(f"{mix.name}: validation wrote no catalog at {path}")
        else:  # never pack samples of a meta file that changed since they were validated
            check_catalog_current(path, mix.name, registry[mix.name].meta_path(root))
        if isinstance(path, RemotePath):  # workers read it by row group: a local copy
            local = staging_dir("catalogs", path.parent) / path.name
            path.get_file(local)
            path = local
        paths[mix.name] = path
    return paths


def _drop_reasons(
    tables: list[pa.Table], cfg: PackConfig
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Per sample: reason code (0 = kept), the reason names, true lengths and image counts."""
    names = ["", "template_error", "image_mismatch", "no_label", "too_long", "too_many_images"]
    if not tables:
        empty = np.zeros(0, dtype=np.int64)
        return empty.astype(np.int8), names, empty, empty
    parts = []
    for t in tables:  # per unit: only the three results ever span all samples (10M: 170 MB)
        n_tok = pc.list_value_length(t.column("ids")).to_numpy()
        n_img = t.column("n_images").to_numpy().astype(np.int64)
        true_len = n_tok.astype(np.int64) + (cfg.visual_tokens - 1) * n_img
        reason = np.zeros(len(true_len), dtype=np.int8)
        reason[n_img > cfg.max_images] = 5  # more images than one packed sequence may hold
        reason[true_len > cfg.capacity] = 4
        reason[t.column("n_supervised").to_numpy() == 0] = 3
        reason[n_img != pc.list_value_length(t.column("images")).to_numpy()] = 2
        reason[t.column("error").is_valid().to_numpy(zero_copy_only=False)] = 1
        parts.append((reason, true_len, n_img))
    reason, true_len, n_img = (np.concatenate(x) for x in zip(*parts, strict=True))
    return reason, names, true_len, n_img


def _mixture(kept: np.ndarray, weight: float, seed: int, dataset: str) -> np.ndarray:
    """floor(weight) copies of every kept sample plus a seeded subset for the fraction."""
    whole, frac = int(math.floor(weight)), weight - math.floor(weight)
    parts = [kept] * whole
    if frac > 0 and len(kept):
        rng = np.random.default_rng([seed, zlib.crc32(dataset.encode())])
        parts.append(np.sort(rng.choice(kept, size=int(round(frac * len(kept))), replace=False)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


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
    processes = max(1, processes or os.cpu_count() or 1)
    tok_path = Path(tokenizer)
    tok = load_tokenizer(tok_path)
    specs = [registry[m.name] for m in recipe.datasets]
    chat = None
    if any(s.data_format == "conversation" for s in specs):
        chat = detect_chat_format(tok, recipe.template).name
    cfg = PackConfig(
        stage=recipe.stage,
        root=str(root_path),
        out=str(staging_dir("pack", remote_out) if remote_out else Path(out) / f"stage{recipe.stage}"),
        tokenizer_path=str(tok_path),
        chat_format=chat,
        capacity=int(max_length or recipe.max_length),
        visual_tokens=int(visual_tokens if visual_tokens is not None else recipe.visual_tokens),
        image_size=int(image_size if image_size is not None else recipe.image_size),
        max_images=recipe.max_images_per_pack,
        seed=int(seed),
        image_dirs={s.name: (str(s.image_path(root_path)) if s.image_dir else None) for s in specs},
        packs_per_shard=int(packs_per_shard),
        buffer_size=int(buffer_size),
        publish=str(remote_out) if remote_out else None,
    )
    if cfg.capacity < cfg.visual_tokens:
        raise OvisDataError(f"max length {cfg.capacity} cannot hold one image ({cfg.visual_tokens} tokens)")
    out_dir = Path(cfg.out)
    if ray is not None and remote_out is not None:  # Ray tasks on other nodes read the work files
        raise OvisDataError(
            f"--ray packs into a folder every node sees (a shared file system), not {remote_out}: "
            "drop --ray (workers on this machine) or pack to shared storage and copy the stage"
        )
    shown = remote_out or out_dir  # what messages name
    if remote_out is not None:
        _pull_state(remote_out, out_dir)
    catalogs = _ensure_catalogs(recipe, registry, root_path, processes)
    caption_templates = {
        m.name: m.caption_template or registry[m.name].caption_template or DEFAULT_CAPTION_TEMPLATE
        for m in recipe.datasets
        if registry[m.name].data_format == "caption"
    }
    # the vocabulary as loaded, which is what tokenized: transformers may add tokens the files lack
    # (a Qwen2 LLM folder's tokenizer gains <|endoftext|>), and the trainer compares the loaded one too
    identity = {**tokenizer_identity(tok_path), "vocab_sha256": vocab_identity(tok)}
    inputs = {
        "format": FORMAT,
        "config": {
            k: v
            for k, v in asdict(cfg).items()
            if k not in ("root", "out", "tokenizer_path", "image_dirs", "publish")
        },
        "tokenizer_sha256": identity["sha256"],
        "datasets": [
            {"name": m.name, "weight": m.weight, "catalog_sha256": _file_sha256(catalogs[m.name])}
            for m in recipe.datasets
        ],
        "caption_templates": caption_templates,
    }
    if holdout:  # only then: a stage packed without one keeps its inputs' hash
        inputs["holdout"] = holdout
    inputs_sha = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
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
                f"{shown} holds shards packed from other inputs (recipe, catalogs, tokenizer or options "
                "changed): use another --out, or --overwrite to replace them"
            )
        shutil.rmtree(out_dir)
        if remote_out is not None:
            remote_out.fs.rm(remote_out.path, recursive=True)
    elif previous == inputs_sha and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if _manifest_is_current(manifest):
            return manifest
        # Else written by an older version (same shards, fewer keys): shards are rewritten to the same
        # bytes below, their stats gaining the keys.
    (out_dir / WORK / "tok").mkdir(parents=True, exist_ok=True)
    _atomic_json(params_path, {"inputs_sha256": inputs_sha, **inputs})
    if remote_out is not None:
        (remote_out / WORK / "inputs.json").put_file(params_path)

    # Phase 1: tokenize every catalog row group not done yet.
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
                    path=str(out_dir / WORK / "tok" / f"{m.name}-{g:05d}.arrow"),
                )
            )
    backend_json = tok.backend_tokenizer.to_str()
    todo = [(u,) for u in units if not Path(u.path).exists()]
    rows = [pq.ParquetFile(u.catalog).metadata.row_group(u.row_group).num_rows for (u,) in todo]
    tok_init = (cfg, backend_json, None, None)
    _run(PackWorker.tokenize_unit, todo, processes, tok_init, "tokenize", progress, rows, ray=ray)

    # Phase 2: drop by reason, apply the mixture, pack.
    tables = [pa.ipc.open_file(pa.memory_map(u.path)).read_all() for u in units]
    counts = np.array([t.num_rows for t in tables], dtype=np.int64)
    bases = np.concatenate(([0], np.cumsum(counts)))
    reason, reason_names, true_len, n_img = _drop_reasons(tables, cfg)
    held = holdout_mask(tables, units, holdout, cfg.seed) if holdout else None
    val = ValSelection()
    del tables  # unmapped now: the pages it read (10M samples: ~0.6 GB) leave this process's RSS
    datasets: dict[str, dict] = {}
    items = []
    chosen = why = np.zeros(0, dtype=np.int64)
    for m in recipe.datasets:
        idx = [i for i, u in enumerate(units) if u.dataset == m.name]
        lo, hi = (bases[idx[0]], bases[idx[-1] + 1]) if idx else (0, 0)
        # The mixture draws from the whole catalog; a drawn sample that cannot be packed is dropped with
        # its reason, so per dataset selected = packed + dropped (write-time drops are added in _manifest).
        chosen = _mixture(np.arange(lo, hi, dtype=np.int64), m.weight, cfg.seed, m.name)
        datasets[m.name] = {}
        if held is not None:
            d = {"catalog": int(hi - lo), "kept": int((reason[lo:hi] == 0).sum()), "weight": m.weight}
            chosen = split_selection(chosen, held, d, m.name, val, reason, reason_names, true_len, n_img)
            datasets[m.name]["held_out"] = d["held_out"]
        why = reason[chosen]
        items.append(chosen[why == 0])
        codes, counts = np.unique(why[why > 0], return_counts=True)
        datasets[m.name] |= {
            "catalog": int(hi - lo),
            "kept": int((reason[lo:hi] == 0).sum()),  # distinct catalog samples that can be packed
            "weight": m.weight,
            "selected": int(len(chosen)),
            "dropped": {
                reason_names[c]: int(n) for c, n in zip(codes.tolist(), counts.tolist(), strict=True)
            },
        }
    # Every array of all samples that is no longer needed goes at once (10M samples: 80 MB each).
    del chosen, why, reason
    items_arr = items[0] if len(items) == 1 else np.concatenate([np.zeros(0, dtype=np.int64), *items])
    del items
    lengths, images = true_len[items_arr], n_img[items_arr]
    del true_len, n_img
    packing = pack_lengths(
        lengths,
        cfg.capacity,
        images=images,
        max_images=cfg.max_images,
        buffer_size=cfg.buffer_size,
        seed=cfg.seed,
    )
    del lengths, images
    samples = items_arr[packing.order]
    sizes = np.diff(packing.offsets)

    # Phase 3: write every shard not done yet.
    _map_indexes(cfg)
    n_shards = math.ceil(packing.n_packs / cfg.packs_per_shard)
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
        p0, p1 = s * cfg.packs_per_shard, min(packing.n_packs, (s + 1) * cfg.packs_per_shard)
        tasks.append((s, sizes[p0:p1], samples[packing.offsets[p0] : packing.offsets[p1]]))
    init = (cfg, backend_json, units, bases)
    weights = [len(t[1]) for t in tasks]
    for st in _run(PackWorker.write_shard, tasks, processes, init, "write", progress, weights, ray=ray):
        done_stats[int(st["name"][-9:-4])] = st
    shards = [done_stats[s] for s in range(n_shards)]

    if held is not None:  # before the stage's manifest, which says the stage (val split too) is complete
        write_val_split(
            cfg,
            val,
            lambda c, t: _run(
                PackWorker.write_shard,
                t,
                processes,
                (c, backend_json, units, bases),
                "write val",
                progress,
                [len(x[1]) for x in t],
                ray=ray,
            ),
            lambda c, d, s: _manifest(c, recipe, identity, inputs_sha, caption_templates, d, s),
        )
    manifest = _manifest(cfg, recipe, identity, inputs_sha, caption_templates, datasets, shards)
    _atomic_json(manifest_path, manifest)
    if remote_out is not None:  # last: the stage is complete when its manifest is there
        (remote_out / MANIFEST).put_file(manifest_path)
    shutil.rmtree(out_dir / WORK / "tok", ignore_errors=True)
    return manifest
