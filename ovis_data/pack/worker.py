"""The pack stage's worker: what one process needs to tokenize a unit or write a shard (`PackWorker`),
and the work files' formats and paths that the stage's orchestration (`stage.py`) shares with it."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tokenizers import Tokenizer

from ..arrowmap import ArrowRows
from ..constants import IGNORE_ID
from ..imagestore import ImageStore
from ..interrupt import removed_on_failure
from ..shardformat import Record, expanded_length, shard_name, supervised_targets
from ..shards import ShardWriter
from ..storage import as_path
from .images import resize_for_vit
from .manifest import DropReason
from .templates import ChatTemplateFormat
from .tokenize import SampleEncoder, load_tokenizer

TOKENIZE_BATCH = 4096
WORK = ".work"

UNIT_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("id", pa.string()),
        ("images", pa.list_(pa.string())),
        ("ids", pa.list_(pa.int32())),
        ("sup", pa.list_(pa.uint8())),  # uint8, not bool: numpy reads it without a copy
        ("n_images", pa.int32()),  # placeholders in the tokens
        ("n_supervised", pa.int32()),
        ("error", pa.string()),  # why the template refused the sample, else null
    ]
)


@dataclass(frozen=True)
class PackConfig:
    """Everything a worker needs, picklable."""

    stage: int
    root: str
    out: str  # OUT/stageN
    tokenizer_path: str
    chat_format: str | None  # qwen | llama3 | gemma | chat_template; None for caption-only stages
    capacity: int
    visual_tokens: int
    image_size: int
    max_images: int
    seed: int
    image_dirs: dict  # dataset -> image_dir (None: text only)
    packs_per_shard: int
    buffer_size: int
    # OUT/stageN as an object-store URL: work files and each shard are written in `out` (a local staging
    # folder), then every finished shard is put there, its stats after it; None: `out` is the folder
    publish: str | None = None


@dataclass(frozen=True)
class Unit:
    dataset: str
    data_format: str
    catalog: str
    row_group: int
    caption_template: str | None
    path: str  # the unit's Arrow file


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_json_text(obj), encoding="utf-8")
    os.replace(tmp, path)


def mapped_index_path(cfg: PackConfig, dataset: str) -> Path:
    return Path(cfg.out) / WORK / "tok" / "index" / f"{dataset}.arrow"  # removed with tok/ when done


class _UnitReader:
    """Random access to one unit's samples, by pread (arrowmap.ArrowRows): a read costs the same whatever
    the unit's size and maps nothing, so a worker's memory does not grow with what it read."""

    COLUMNS = ("row", "id", "images", "ids", "sup")

    def __init__(self, path: str):
        self._rows = ArrowRows(path, list(self.COLUMNS))

    def sample(self, i: int) -> tuple[dict, np.ndarray, np.ndarray]:
        row, id_, images, ids, sup = self._rows.read(i, self.COLUMNS)
        return {"row": row, "id": id_, "images": images or []}, ids, sup.view(np.bool_)


class PackWorker:
    """One process's pack state, made by the pool's initializer (`dispatch._init_worker`) or once per run
    in a Ray worker, and shared by the tasks that process runs: the run's settings, the tokenizer (as
    JSON; the encoder is built on first use), and, for writing shards, the units and their first sample
    numbers (`bases`), the open unit readers and image stores."""

    def __init__(
        self, cfg: PackConfig, backend_json: str, units: list[Unit] | None, bases: np.ndarray | None
    ):
        self.cfg = cfg
        self.backend_json = backend_json
        self.units = units  # None while tokenizing
        self.bases = bases
        self.readers: dict[int, _UnitReader] = {}
        self.stores: dict[str, ImageStore | None] = {}
        self.encoder: SampleEncoder | None = None
        self.ray_run: str | None = None  # the pack run a Ray worker's state belongs to (dispatch._ray_task)

    def _encoder(self) -> SampleEncoder:
        if self.encoder is None:
            cfg = self.cfg
            if cfg.chat_format == "chat_template":  # needs the Hugging Face tokenizer's template engine
                tok = load_tokenizer(cfg.tokenizer_path)
                self.encoder = SampleEncoder(tok, ChatTemplateFormat(tok))
            else:
                backend = Tokenizer.from_str(self.backend_json)
                from .templates import FIXED_FORMATS

                self.encoder = SampleEncoder(backend, FIXED_FORMATS.get(cfg.chat_format or ""))
        return self.encoder

    def tokenize_unit(self, unit: Unit) -> str:
        enc = self._encoder()
        pf = pq.ParquetFile(unit.catalog)
        cols = (
            ["row", "id", "images", "caption"]
            if unit.data_format == "caption"
            else ["row", "id", "images", "roles", "texts"]
        )
        tmp = Path(unit.path + ".tmp")
        with (
            removed_on_failure(tmp),
            pa.OSFile(str(tmp), "wb") as sink,
            pa.ipc.new_file(sink, UNIT_SCHEMA) as writer,
        ):
            for batch in pf.iter_batches(
                batch_size=TOKENIZE_BATCH, row_groups=[unit.row_group], columns=cols
            ):
                if unit.data_format == "caption":
                    e = enc.encode_captions(batch.column("caption").to_pylist(), unit.caption_template)
                else:
                    roles = [r or [] for r in batch.column("roles").to_pylist()]
                    texts = [t or [] for t in batch.column("texts").to_pylist()]
                    e = enc.encode_conversations(roles, texts)
                offsets = pa.array(e.offsets.astype(np.int32))
                images = batch.column("images")
                if images.null_count:
                    images = pa.array([x or [] for x in images.to_pylist()], pa.list_(pa.string()))
                writer.write_batch(
                    pa.record_batch(
                        [
                            batch.column("row"),
                            batch.column("id"),
                            images,
                            pa.ListArray.from_arrays(offsets, pa.array(e.ids)),
                            pa.ListArray.from_arrays(offsets, pa.array(e.supervised.view(np.uint8))),
                            pa.array(e.n_images.astype(np.int32)),
                            pa.array(e.n_supervised.astype(np.int32)),
                            pa.array([e.errors.get(i) for i in range(len(e))], pa.string()),
                        ],
                        schema=UNIT_SCHEMA,
                    )
                )
        os.replace(tmp, unit.path)
        return unit.path

    def _store(self, dataset: str) -> ImageStore | None:
        stores = self.stores
        if dataset not in stores:
            image_dir = self.cfg.image_dirs[dataset]
            stores[dataset] = ImageStore(as_path(image_dir)) if image_dir is not None else None
            mapped = mapped_index_path(self.cfg, dataset)
            if stores[dataset] is not None and stores[dataset].layout == "shards" and mapped.exists():
                stores[dataset].map_index(mapped)
        return stores[dataset]

    def write_shard(self, index: int, pack_sizes: np.ndarray, samples: np.ndarray) -> dict:
        cfg, units, bases, readers = self.cfg, self.units, self.bases, self.readers
        name = shard_name(cfg.stage, index)
        writer = ShardWriter(Path(cfg.out) / name)
        stats: dict[str, Any] = {"name": name, "records": 0, "samples": 0, "tokens": 0, "input_ids": 0}
        stats.update(images=0, datasets=Counter(), record_tokens=[], record_supervised=[])
        stats["dropped"] = defaultdict(Counter)  # dataset -> reason -> samples
        try:
            pos = 0
            for p, size in enumerate(pack_sizes.tolist()):
                ids_parts, sup_parts, lengths, jpgs, prov = [], [], [], [], []
                for g in samples[pos : pos + size].tolist():
                    u = int(np.searchsorted(bases, g, "right")) - 1
                    if u not in readers:
                        readers[u] = _UnitReader(units[u].path)
                    meta, ids, sup = readers[u].sample(g - int(bases[u]))
                    dataset = units[u].dataset
                    store = self._store(dataset) if meta["images"] else None
                    try:
                        sample_jpgs = [
                            resize_for_vit(store.read_bytes(x), cfg.image_size)[0] for x in meta["images"]
                        ]
                    except Exception as e:  # gone or broken since validation: drop the sample, keep the pack
                        bomb = isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning)
                        why = DropReason.DECOMPRESSION_BOMB if bomb else DropReason.IMAGE_UNREADABLE
                        stats["dropped"][dataset][why.label] += 1
                        continue
                    ids_parts.append(ids)
                    sup_parts.append(sup)
                    lengths.append(len(ids))
                    jpgs += sample_jpgs
                    prov.append({"dataset": dataset, "row": meta["row"], "id": meta["id"]})
                    stats["datasets"][dataset] += 1
                pos += size
                if not prov:
                    continue
                input_ids = np.concatenate(ids_parts).astype(np.int32)
                labels = np.where(np.concatenate(sup_parts), input_ids, np.int32(IGNORE_ID)).astype(np.int32)
                tokens = expanded_length(len(input_ids), len(jpgs), cfg.visual_tokens)
                lengths_arr = np.asarray(lengths, dtype=np.int32)
                record = Record(
                    key=f"{index:05d}_{p:05d}",
                    input_ids=input_ids,
                    labels=labels,
                    lengths=lengths_arr,
                    images=jpgs,
                    meta={"samples": prov, "tokens": tokens, "images": len(jpgs)},
                )
                writer.write(record)
                stats["records"] += 1
                stats["samples"] += len(prov)
                stats["tokens"] += tokens
                stats["input_ids"] += len(input_ids)
                stats["images"] += len(jpgs)
                stats["record_tokens"].append(int(tokens))
                stats["record_supervised"].append(supervised_targets(labels, lengths_arr))
            stats["datasets"] = dict(sorted(stats["datasets"].items()))
            stats["dropped"] = {d: dict(sorted(c.items())) for d, c in sorted(stats["dropped"].items())}
            stats["sha256"], stats["bytes"] = writer.close()
        except BaseException:
            writer.abort()
            raise
        if cfg.publish is not None:  # object storage: the whole tar in one PUT, then its stats beside it
            remote = as_path(cfg.publish)
            (remote / name).put_file(writer.path)
            writer.path.unlink()
            (remote / WORK / "shards" / f"{index:05d}.json").write_text(_json_text(stats))
        # Written after the rename: a shard is done when its tar and its stats (with the sha256) are there.
        atomic_json(Path(cfg.out) / WORK / "shards" / f"{index:05d}.json", stats)
        return stats
