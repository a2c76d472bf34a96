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
OPTS = FetchOptions(layout="shards", shard_size=16, processes=1, net=NET)  # 10 shards of the 160 rows


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


@pytest.fixture(scope="module")
def local_fetch(corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """coyo-10m fetched by the local engine (read-only): the reference for the Ray run and the images that
    validate and pack read."""
    root = _root(corpus, tmp_path_factory.mktemp("fetched") / "local")
    (report,) = fetch_datasets(["coyo-10m"], root, OPTS, load_registry())
    return root, report


def test_fetch_on_ray_losing_a_worker_node_gives_the_local_runs_images_and_report(
    cluster: Cluster, corpus: Path, local_fetch, tmp_path: Path
):
    """A worker node removed mid-run (its processes die with their shards unfinished): no row lost, and the
    images and report are those of the local engine."""
    local, want = local_fetch
    root = _root(corpus, tmp_path / "ray")
    opts = FetchOptions(**{**vars(OPTS), "ray": cluster.address})
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
    (got,) = result
    assert done_at_kill < got.shards["total"] == 10  # the node died mid-run
    assert got.success + sum(got.failed.values()) == got.total == 160
    assert got.failed == {"http_404": 3} and got.shards["unfinished"] == 0
    assert len(load_index(image_dir)) == got.success
    # the local run's report: a shard whose task died is redone whole by its retry (one that had finished
    # just before counts as done before it); the local run did every shard once
    same = ("dataset", "total", "success", "failed", "layout")
    assert {k: _counts(got)[k] for k in same} == {k: _counts(want)[k] for k in same}
    assert got.shards["done_before"] + got.shards["done_now"] == want.shards["done_now"] == 10
    assert got.this_run["attempted"] == 16 * got.shards["done_now"]
    assert got.this_run["success"] + got.this_run["failed"] == got.this_run["attempted"]
    assert want.this_run == {"attempted": 160, "success": 157, "failed": 3}
    image_dir_name = "images/coyo_10m"
    assert _images(root / image_dir_name) == _images(local / image_dir_name)
    # a re-run (as after the driver was killed) resumes from the done-markers: nothing left to do
    (again,) = fetch_datasets(["coyo-10m"], root, opts)
    assert again.this_run["attempted"] == 0 and again.success == got.success


def test_validate_and_pack_on_ray_match_a_local_run(cluster: Cluster, local_fetch, tmp_path: Path):
    from test_pack import write_recipe
    from test_templates_tokenizers import qwen_path

    from ovis_data.pack.stage import pack_stage
    from ovis_data.validate.dataset import validate_dataset

    root = tmp_path / "data"
    shutil.copytree(local_fetch[0], root)  # validate and pack write catalogs into it
    spec = load_registry()["coyo-10m"]
    checked = validate_dataset(spec, root, "deep", catalog_out=tmp_path / "cat", ray=cluster.address)
    want = validate_dataset(spec, root, "deep", processes=1)  # the catalog pack reads
    assert (checked.total, checked.good, checked.by_reason) == (want.total, want.good, want.by_reason)
    assert want.good > 0 and want.by_reason  # the demo's broken images are among them
    recipe = write_recipe(tmp_path, 1, {"coyo-10m": 1.0}, 1024)
    local = pack_stage(recipe, root, qwen_path(), tmp_path / "local", processes=1, packs_per_shard=4)
    on_ray = pack_stage(recipe, root, qwen_path(), tmp_path / "ray", packs_per_shard=4, ray=cluster.address)
    assert len(on_ray["shards"]) > 2 and on_ray == local
    for s in local["shards"]:
        name = s["name"]
        assert (tmp_path / "ray" / "stage1" / name).read_bytes() == (
            tmp_path / "local" / "stage1" / name
        ).read_bytes()
