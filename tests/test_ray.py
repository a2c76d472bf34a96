"""fetch, validate and pack --ray on a real multi-node Ray cluster on this machine (a head without CPUs
and two worker nodes of one CPU each, `ray.cluster_utils.Cluster`, started and shut down here), against
the local engine."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from ovis_data.fetch import FetchOptions, NetParams, fetch_datasets  # noqa: E402
from ovis_data.imagestore import ImageStore, load_index  # noqa: E402
from ovis_data.registry import load_registry  # noqa: E402

NET = NetParams(allow_private=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    c.add_node(num_cpus=1)
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _root(corpus: Path, dest: Path) -> Path:
    spec = load_registry()["coyo-10m"]
    (dest / "meta_files").mkdir(parents=True)
    shutil.copy(corpus / "meta_files" / spec.meta_file, dest / "meta_files")
    return dest


def _images(image_dir: Path) -> dict[str, str]:
    store = ImageStore(image_dir)
    paths = load_index(image_dir).column("image_path").to_pylist()
    return {p: hashlib.sha256(store.read_bytes(p)).hexdigest() for p in paths}


def _counts(report) -> dict:
    r = report.to_json()
    return {k: r[k] for k in ("dataset", "total", "success", "failed", "layout", "shards", "this_run")}


def test_fetch_on_ray_gives_the_local_runs_images_and_report(cluster: Cluster, corpus: Path, tmp_path: Path):
    opts = FetchOptions(layout="shards", shard_size=32, processes=1, net=NET)
    local = _root(corpus, tmp_path / "local")
    (want,) = fetch_datasets(["coyo-10m"], local, opts, load_registry())
    on_ray = _root(corpus, tmp_path / "ray")
    (got,) = fetch_datasets(["coyo-10m"], on_ray, FetchOptions(**{**vars(opts), "ray": cluster.address}))
    assert _counts(got) == _counts(want) and got.failed == {"http_404": 3} and got.shards["total"] == 5
    image_dir = "images/coyo_10m"
    assert _images(on_ray / image_dir) == _images(local / image_dir)
    # a re-run (as after the driver was killed) resumes from the done-markers: nothing left to do
    (again,) = fetch_datasets(["coyo-10m"], on_ray, FetchOptions(**{**vars(opts), "ray": cluster.address}))
    assert again.this_run["attempted"] == 0 and again.success == got.success


def test_a_worker_node_lost_mid_fetch_costs_no_row(cluster: Cluster, corpus: Path, tmp_path: Path):
    root = _root(corpus, tmp_path / "ray")
    opts = FetchOptions(layout="shards", shard_size=16, processes=1, net=NET, ray=cluster.address)
    result: list = []
    run = threading.Thread(target=lambda: result.extend(fetch_datasets(["coyo-10m"], root, opts)))
    run.start()
    image_dir = root / "images" / "coyo_10m"
    deadline = time.monotonic() + 120
    while not list(image_dir.glob("*_stats.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = next(n for n in cluster.worker_nodes)
    cluster.remove_node(victim)  # its processes die with their shards unfinished
    done_at_kill = len(list(image_dir.glob("*_stats.json")))
    cluster.add_node(num_cpus=1)
    run.join(timeout=240)
    assert not run.is_alive() and result
    (report,) = result
    assert done_at_kill < report.shards["total"] == 10  # the node died mid-run
    assert report.success + sum(report.failed.values()) == report.total == 160
    assert report.failed == {"http_404": 3} and report.shards["unfinished"] == 0
    assert len(load_index(image_dir)) == report.success


def test_validate_and_pack_on_ray_match_a_local_run(cluster: Cluster, corpus: Path, tmp_path: Path):
    from test_pack import _recipe
    from test_templates_tokenizers import qwen_path

    from ovis_data.pack.stage import pack_stage
    from ovis_data.validate.dataset import validate_dataset

    root = _root(corpus, tmp_path / "data")
    opts = FetchOptions(layout="shards", shard_size=64, processes=1, net=NET)
    fetch_datasets(["coyo-10m"], root, opts, load_registry())
    spec = load_registry()["coyo-10m"]
    checked = validate_dataset(spec, root, "deep", catalog_out=tmp_path / "cat", ray=cluster.address)
    want = validate_dataset(spec, root, "deep", processes=1)  # the catalog pack reads
    assert (checked.total, checked.good, checked.by_reason) == (want.total, want.good, want.by_reason)
    assert want.good > 0 and want.by_reason  # the demo's broken images are among them
    recipe = _recipe(tmp_path, 1, {"coyo-10m": 1.0}, 1024)
    local = pack_stage(recipe, root, qwen_path(), tmp_path / "local", processes=1, packs_per_shard=4)
    on_ray = pack_stage(recipe, root, qwen_path(), tmp_path / "ray", packs_per_shard=4, ray=cluster.address)
    assert len(on_ray["shards"]) > 2 and on_ray == local
    for s in local["shards"]:
        name = s["name"]
        assert (tmp_path / "ray" / "stage1" / name).read_bytes() == (
            tmp_path / "local" / "stage1" / name
        ).read_bytes()
