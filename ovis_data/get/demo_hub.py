"""The built-in demo corpus published the way the real sources are, on a local Hub-compatible server: the
meta files in one dataset repository (as the real ones are in one), each image folder packed as its real
counterpart is (a zip, a tar.gz with a folder to strip, a split zip shared by two datasets, a parquet of
image bytes, several zips by pattern, a plain URL), plus a dataset_info.json whose `source` entries point
there. `ovis-data demo` and the tests get the corpus from it with `ovis-data get`."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..demo_corpus import build_demo_corpus
from ..registry import DatasetSpec, load_registry
from ..resources import resource_path
from .hubserver import HubServer, serve_hub

META_REPO = "ovis-demo/Ovis-dataset"
SPLIT_PART = 256 << 10  # bytes per part of the split archive


def _digest(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _zip(folder: Path, dest: Path, prefix: str = "", files: list[Path] | None = None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in files if files is not None else _files(folder):
            info = zipfile.ZipInfo(prefix + p.relative_to(folder).as_posix(), (2024, 1, 1, 0, 0, 0))
            zf.writestr(info, p.read_bytes(), zipfile.ZIP_DEFLATED)


def _tar(folder: Path, dest: Path, prefix: str, mode: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, mode) as tf:
        for p in _files(folder):
            data = p.read_bytes()
            info = tarfile.TarInfo(prefix + p.relative_to(folder).as_posix())
            info.size, info.mtime = len(data), 1704067200
            tf.addfile(info, io.BytesIO(data))


def _image_source(spec: DatasetSpec, images: Path, repos: Path, files: Path, base_url: str) -> list[dict]:
    """Pack one image_dir the way a real source of its kind is packed; returns its `images` entries."""
    d = spec.image_dir
    folder = images / str(d)
    repo = f"ovis-demo/{d}"
    out = repos / repo
    if d == "sharegpt4v":  # a tar.gz whose members sit under a folder the meta file does not name
        _tar(folder, out / "data.tar.gz", "share/sharegpt4v/", "w:gz")
        return [
            {"hub": repo, "path": "data.tar.gz", "strip": "share/sharegpt4v/", **_digest(out / "data.tar.gz")}
        ]
    if d == "allava_laion":  # a zip split into parts, shared by the caption and instruct datasets
        whole = files / "tmp" / "laion.zip"
        _zip(folder, whole, prefix="allava_laion/images/")
        data = whole.read_bytes()
        names = []
        for i in range(0, len(data), SPLIT_PART):
            name = f"images.zip.{i // SPLIT_PART + 1:03d}"
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data[i : i + SPLIT_PART])
            names.append(name)
        shutil.rmtree(files / "tmp")
        sizes = [(out / n).stat().st_size for n in names]
        return [
            {"hub": repo, "parts": names, "size": sizes, "format": "zip", "strip": "allava_laion/images/"}
        ]
    if d == "allava_vflan":  # several archives matched by a pattern, each holding part of the folder
        all_files = _files(folder)
        for k in range(3):
            _zip(folder, out / f"images/part_{k}.zip", files=all_files[k::3])
        return [{"hub": repo, "pattern": "images/part_*.zip"}]
    if d == "synthdog":  # rows of image bytes in parquet files, as HF `datasets` writes Image features
        rows = [{"bytes": p.read_bytes(), "path": p.relative_to(folder).as_posix()} for p in _files(folder)]
        (out / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({"image": rows, "split": ["train"] * len(rows)}), out / "data/train-00000.parquet"
        )
        return [
            {"hub": repo, "path": "data/train-00000.parquet", **_digest(out / "data/train-00000.parquet")}
        ]
    if d == "textvqa":  # a publisher's site: a plain URL, images under train_images/
        _zip(folder, files / "textvqa/train_val_images.zip", prefix="train_images/")
        return [{"url": f"{base_url}/textvqa/train_val_images.zip", "strip": "train_images/"}]
    if d == "scienceqa":  # an archive holding more than the images: only *.jpg/*.png are taken
        _zip(folder, out / "train.zip", prefix="train/")
        with zipfile.ZipFile(out / "train.zip", "a") as zf:
            zf.writestr("train/README.txt", "not an image: left out by 'include'")
        return [{"hub": repo, "path": "train.zip", "strip": "train/", "include": ["*.jpg", "*.png"]}]
    _zip(folder, out / "images.zip")
    return [{"hub": repo, "path": "images.zip", **_digest(out / "images.zip")}]


def publish_demo(
    repos: Path,
    files: Path,
    base_url: str,
    info_path: Path,
    seed: int = 0,
    stages: tuple[int, ...] = (1, 2, 3),
) -> Path:
    """Build the demo corpus (of these stages' datasets), publish it under `repos` (Hub repositories) and
    `files` (plain URLs, served at base_url), and write the dataset_info.json whose sources point there."""
    work = info_path.parent / "demo-corpus-build"
    shutil.rmtree(work, ignore_errors=True)
    build_demo_corpus(work, seed=seed, url_root=files, base_url=base_url, stages=stages)
    raw = json.loads(resource_path("dataset_info.json").read_text(encoding="utf-8"))
    meta_repo = repos / META_REPO
    published: dict[str, list[dict]] = {}
    raw = {n: e for n, e in raw.items() if e["stage"] in stages}
    for spec in load_registry().values():
        if spec.stage not in stages:
            continue
        entry = raw[spec.name]
        meta = meta_repo / "meta_files" / spec.meta_file
        meta.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.meta_path(work), meta)
        source: dict = {
            "meta_file": {"hub": META_REPO, "path": f"meta_files/{spec.meta_file}", **_digest(meta)}
        }
        if spec.url_source is not None:
            url_list = meta_repo / "meta_files" / spec.url_source.url_list
            if spec.url_source.url_list != spec.meta_file:
                shutil.copyfile(spec.url_list_path(work), url_list)
            source["url_list"] = {"hub": META_REPO, "path": f"meta_files/{spec.url_source.url_list}"}
            source["images"] = []  # fetched from their URLs
        elif spec.image_dir is not None:
            if spec.image_dir not in published:
                published[spec.image_dir] = _image_source(spec, work / "images", repos, files, base_url)
            source["images"] = published[spec.image_dir]
        entry["source"] = source
    shutil.rmtree(work)
    info_path.write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
    return info_path


@contextmanager
def demo_hub(
    folder: Path, seed: int = 0, stages: tuple[int, ...] = (1, 2, 3)
) -> Iterator[tuple[HubServer, Path]]:
    """Publish the demo corpus under folder and serve it on 127.0.0.1; yields (server, dataset_info.json).
    Point get at it with Hub(endpoint=server.url) or HF_ENDPOINT=server.url."""
    folder = Path(folder)
    repos, files = folder / "repos", folder / "files"
    for d in (repos, files):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    with serve_hub(repos, files) as server:
        info = publish_demo(
            repos, files, f"{server.url}/files", folder / "demo_dataset_info.json", seed, stages
        )
        yield server, info
