"""Object storage end to end: an S3-compatible server (moto's, on 127.0.0.1, started here) holds the data
root; fetch writes into it, validate reads it, pack writes shards there and the training loader streams
them; every result is compared with the same run on a local disk."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from test_pack import write_recipe
from test_templates_tokenizers import qwen_path

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from ovis_data.fetch import FetchOptions, NetParams, fetch_datasets  # noqa: E402
from ovis_data.imagestore import load_index  # noqa: E402
from ovis_data.pack.stage import pack_stage  # noqa: E402
from ovis_data.registry import load_registry  # noqa: E402
from ovis_data.shards import iter_records  # noqa: E402
from ovis_data.storage import RemotePath, as_path  # noqa: E402
from ovis_data.validate.dataset import validate_dataset  # noqa: E402

BUCKET = "ovis-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A moto S3 server on loopback with one bucket; the environment points s3fs (and subprocesses) at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "OVIS_STAGING": str(tmp_path_factory.mktemp("staging")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        root = RemotePath(f"s3://{BUCKET}")
        root.fs.mkdir(BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _same_report(a: dict, b: dict) -> dict:
    keep = ("dataset", "total", "success", "failed", "layout", "shards", "this_run")
    assert {k: a[k] for k in keep} == {k: b[k] for k in keep}
    return a


def test_fetch_validate_pack_and_load_through_s3(s3: dict, corpus: Path, tmp_path: Path) -> None:
    registry = load_registry()
    spec = registry["coyo-10m"]
    remote = RemotePath(f"s3://{BUCKET}/data")
    remote.fs.put(str(corpus / "meta_files" / spec.meta_file), f"{remote.path}/meta_files/{spec.meta_file}")

    # fetch: the CLI into s3://, the library into a local copy of the same root
    report = tmp_path / "fetch.json"
    args = ["fetch", "coyo-10m", "--root", str(remote), "--layout", "shards", "--shard-size", "64"]
    out = run_cli(*args, "--allow-private", "--processes", "1", "--report", str(report), env=s3)
    assert out.returncode == 0, out.stdout + out.stderr
    local = tmp_path / "local"
    (local / "meta_files").mkdir(parents=True)
    shutil.copy(corpus / "meta_files" / spec.meta_file, local / "meta_files")
    opts = FetchOptions(layout="shards", shard_size=64, processes=1, net=NetParams(allow_private=True))
    (local_report,) = fetch_datasets(["coyo-10m"], local, opts, registry)
    s3_report = _same_report(json.loads(report.read_text()), local_report.to_json())
    assert s3_report["failed"] == {"http_404": 3} and s3_report["shards"]["total"] == 3
    image_dir = remote / "images" / spec.image_dir
    assert sorted(x.name for x in image_dir.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    remote_index, local_index = load_index(image_dir), load_index(local / "images" / spec.image_dir)
    assert remote_index.column("image_path").to_pylist() == local_index.column("image_path").to_pylist()
    assert not list((image_dir / ".fetch" / "tmp").glob("*"))  # nothing half-written in the store
    # a re-run resumes from the done-markers in the store: nothing left to do
    again = fetch_datasets(["coyo-10m"], remote, opts, registry)[0]
    assert again.this_run["attempted"] == 0 and again.success == s3_report["success"]

    # validate reads the store (header checks through ranged GETs), writes its catalog there
    got = validate_dataset(spec, remote, mode="deep", processes=1)
    want = validate_dataset(spec, local, mode="deep", processes=1)
    assert got.error is None and got.good == want.good > 0
    assert (got.total, got.by_reason) == (want.total, want.by_reason)
    assert (remote / "catalogs" / "coyo-10m.parquet").is_file()

    # pack from the store into the store: the same shards, byte for byte, as packing the local copy
    recipe = write_recipe(tmp_path, 1, {"coyo-10m": 1.0}, 1024)
    packed = RemotePath(f"s3://{BUCKET}/packed")
    m_s3 = pack_stage(recipe, str(remote), qwen_path(), str(packed), processes=1, packs_per_shard=4)
    m_local = pack_stage(recipe, local, qwen_path(), tmp_path / "packed", processes=1, packs_per_shard=4)
    assert len(m_s3["shards"]) > 1
    assert [s["sha256"] for s in m_s3["shards"]] == [s["sha256"] for s in m_local["shards"]]
    stage = packed / "stage1"
    for s in m_s3["shards"]:
        assert (stage / s["name"]).read_bytes() == (tmp_path / "packed" / "stage1" / s["name"]).read_bytes()
    assert json.loads((stage / "manifest.json").read_text())["shards"] == m_s3["shards"]
    assert not (stage / f"{m_s3['shards'][0]['name']}.tmp").exists()
    # a re-run finds the finished stage in the store
    assert pack_stage(recipe, str(remote), qwen_path(), str(packed), processes=1, packs_per_shard=4) == m_s3

    # the loader's reads: records streamed from s3:// equal the local ones
    first = m_s3["shards"][0]["name"]
    streamed = [(i, r.input_ids.tolist(), r.images) for i, r in iter_records(stage / first)]
    on_disk = [
        (i, r.input_ids.tolist(), r.images) for i, r in iter_records(tmp_path / "packed/stage1" / first)
    ]
    assert streamed == on_disk and len(streamed) == m_s3["shards"][0]["records"]


def test_trainer_loader_streams_a_stage_from_s3(s3: dict, tmp_path: Path) -> None:
    """PackedStage over s3://.../stageN gives the micro-batches it gives over the same local folder."""
    import hashlib
    import itertools

    from test_loader import PROCESSOR, VISUAL_TOKENS, write_stage

    from ovis_model.train.dataset import PackedStage
    from ovis_model.train.loader import TrainLoader

    local = write_stage(tmp_path / "stage3")
    remote = RemotePath(f"s3://{BUCKET}/loader/stage3")
    remote.fs.put(str(local) + "/", remote.path + "/", recursive=True)

    def fingerprints(data_dir: object) -> list[str]:
        ds = PackedStage(
            data_dir, micro_batch_tokens=200, image_processor=PROCESSOR, num_visual_tokens=VISUAL_TOKENS,
            seed=3, rank=0, world_size=1, window=8,
        )  # fmt: skip
        loader = TrainLoader(ds, num_workers=1)  # endless: one epoch's micro-batches
        batches = itertools.islice(loader, loader.micro_batches_per_epoch)
        return [hashlib.sha256(b["inputs"]["input_ids"].numpy().tobytes()).hexdigest() for b in batches]

    assert isinstance(as_path(str(remote)), RemotePath)
    got = fingerprints(str(remote))
    assert got and got == fingerprints(local)
