"""`ovis-data get` against a Hub-compatible server and a plain Range server on 127.0.0.1 (one per module),
serving archives made here: formats, layout mapping, verification, faults, resume, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovis_data.errors import OvisDataError
from ovis_data.get import GetOptions, Hub, get
from ovis_data.get.hubserver import serve_hub
from ovis_data.registry import load_registry

REPO = Path(__file__).resolve().parents[1]
rng = random.Random(0)
IMGS = {f"{d}/{i}.jpg": rng.randbytes(rng.randint(2000, 9000)) for d in ("a", "b") for i in range(6)}
IMGS["c.png"] = rng.randbytes(5000)
TOKEN = "hf_good_token"


def _zip(path: Path, files: dict[str, bytes], prefix: str = "") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(prefix + name, (2024, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return path.read_bytes()


def _tar(path: Path, files: dict[str, bytes], mode: str = "w", extra: list[tarfile.TarInfo] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)


def _meta(images: list[str]) -> bytes:
    rows = [
        {"id": f"s{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A thing."}]}
        for i, name in enumerate(images)
    ]  # fmt: skip
    return json.dumps(rows).encode()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("hub")
    repos, files = base / "repos", base / "files"
    r = repos / "t" / "imgs"
    _zip(r / "plain.zip", IMGS)
    whole = _zip(base / "split.zip", IMGS, prefix="x/")
    third = len(whole) // 3 + 1
    for k in range(3):
        (r / f"split.zip.00{k + 1}").write_bytes(whole[k * third : (k + 1) * third])
        (files / f"split.zip.00{k + 1}").parent.mkdir(parents=True, exist_ok=True)
        (files / f"split.zip.00{k + 1}").write_bytes(whole[k * third : (k + 1) * third])
    _tar(r / "pre.tar.gz", {f"top/images/{n}": d for n, d in IMGS.items()} | {"top/README": b"x"}, "w:gz")
    rows = [{"bytes": d, "path": n} for n, d in IMGS.items()]
    (r / "data").mkdir()
    pq.write_table(pa.table({"image": rows, "split": ["train"] * len(rows)}), r / "data" / "train.parquet")
    (r / "big.bin").write_bytes(rng.randbytes(24 << 20))  # past huggingface_hub's 10 MB read chunk
    link = tarfile.TarInfo("pics/link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../outside.txt"
    dev = tarfile.TarInfo("pics/null")
    dev.type = tarfile.CHRTYPE
    evil = {"pics/ok.jpg": b"fine", "../../evil.txt": b"escaped", "/abs_evil.txt": b"escaped"}
    _tar(r / "evil.tar", evil, extra=[link, dev])
    _zip(r / "bomb.zip", {"zeros.bin": bytes(24 << 20)})
    meta = repos / "t" / "meta"
    meta.mkdir(parents=True)
    (meta / "meta.json").write_bytes(_meta(sorted(IMGS)))
    pq.write_table(
        pa.table({"image_path": sorted(IMGS), "caption": ["a caption"] * len(IMGS)}), meta / "cap.parquet"
    )
    gated = repos / "t" / "gated"
    gated.mkdir(parents=True)
    (gated / "meta.json").write_bytes(_meta(sorted(IMGS)))
    _tar(files / "plain.tar", IMGS)
    (files / "many.zip").parent.mkdir(parents=True, exist_ok=True)
    many = {f"m/{i:05d}.jpg": rng.randbytes(700) for i in range(2500)}
    _zip(files / "many.zip", many)
    if shutil.which("zip"):  # a spanned zip as Info-ZIP writes it (zip -s): parts .z01 ... then .zip
        src = base / "span-src"
        for name, data in IMGS.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(data)
        (repos / "t" / "span").mkdir(parents=True)
        cmd = ["zip", "-q", "-r", "-s", "64k", str(repos / "t/span/images.zip"), "."]
        subprocess.run(cmd, cwd=src, check=True)
    with serve_hub(repos, files, gated={"t/gated": {TOKEN}}) as server:
        yield server


def _info(tmp: Path, entries: dict[str, dict]) -> Path:
    full = {}
    for name, e in entries.items():
        full[name] = {"meta_file": e.pop("meta", "meta.json"), "image_dir": e.pop("image_dir", name),
                      "data_format": e.pop("format", "conversation"), "stage": 3, "source": e}  # fmt: skip
    path = tmp / "info.json"
    path.write_text(json.dumps(full))
    return path


def _run(server, info: Path, root: Path, **kw) -> object:
    opts = GetOptions(hub=Hub(endpoint=server.url, token=kw.pop("token", False)), **kw)
    return get(list(load_registry(info).values()), root, opts)


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _images(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in _tree(folder).items() if not k.startswith(".get/")}


META = {"hub": "t/meta", "path": "meta.json"}
TGZ = {"hub": "t/imgs", "path": "pre.tar.gz", "strip": "top/images/"}


def test_formats_layouts_and_rerun(hub, tmp_path: Path) -> None:
    plain = (hub.repos / "t/imgs/plain.zip").read_bytes()
    digest = {"size": len(plain), "sha256": hashlib.sha256(plain).hexdigest()}
    info = _info(tmp_path, {
        "zipped": {"meta_file": META, "images": [
            {"hub": "t/imgs", "path": "plain.zip", **digest}]},
        "split": {"meta_file": META, "images": [
            {"hub": "t/imgs", "parts": [f"split.zip.00{k}" for k in (1, 2, 3)], "strip": "x/"}]},
        "urlsplit": {"images": [{"parts": [f"{hub.url}/files/split.zip.00{k}" for k in (1, 2, 3)],
                                 "strip": "x/"}]},
        "tgz": {"meta_file": META, "images": [TGZ]},
        "parq": {"meta_file": META, "images": [{"hub": "t/imgs", "path": "data/train.parquet"}]},
        "partial": {"meta_file": META, "images": [
            {"hub": "t/imgs", "path": "plain.zip", "include": ["a/*"], "into": "from_zip/"},
            {"url": f"{hub.url}/files/plain.tar", "include": ["b/*", "c.png"], "into": "from_zip/"}]},
        "caps": {"meta": "cap.parquet", "format": "caption", "image_dir": "zipped",
                 "meta_file": {"hub": "t/meta", "path": "cap.parquet"}},
    })  # fmt: skip
    root = tmp_path / "root"
    out = _run(hub, info, root)
    assert out.exit_code == 0, [r.detail for r in out.results]
    for d in ("zipped", "split", "urlsplit", "tgz", "parq"):
        assert _images(root / "images" / d) == IMGS, d
    assert _images(root / "images" / "partial") == {f"from_zip/{k}": v for k, v in IMGS.items()}
    assert (root / "meta_files" / "meta.json").read_bytes() == (hub.repos / "t/meta/meta.json").read_bytes()
    assert pq.read_table(root / "meta_files" / "cap.parquet").num_rows == len(IMGS)
    assert not (root / "downloads").exists()  # archives deleted once extracted
    missing = {g.dataset: g.missing for g in out.gaps}
    assert missing["zipped"] == missing["caps"] == 0 and missing["partial"] == len(IMGS)  # under from_zip/
    # a re-run is a no-op that touches nothing
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = _run(hub, info, root)
    assert {r.status for r in again.results} == {"already done"}
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs Info-ZIP's zip to make a spanned archive")
def test_spanned_zip_by_parts_pattern_and_flatten(hub, tmp_path: Path) -> None:
    assert len(list((hub.repos / "t/span").glob("images.z*"))) >= 2
    info = _info(tmp_path, {
        "span": {"images": [{"hub": "t/span", "parts_pattern": "images.z*", "format": "zip"}]},
        "flat": {"images": [{"hub": "t/imgs", "path": "plain.zip", "include": ["a/*"], "flatten": True,
                             "into": "images/"}]},
    })  # fmt: skip
    out = _run(hub, info, tmp_path / "root")
    assert out.exit_code == 0, [r.detail for r in out.results]
    assert _images(tmp_path / "root/images/span") == IMGS
    assert _images(tmp_path / "root/images/flat") == {
        f"images/{k[2:]}": v for k, v in IMGS.items() if k[0] == "a"
    }
    again = _run(hub, info, tmp_path / "root")  # done-markers: no listing needed to know it is done
    assert {r.status for r in again.results} == {"already done"}


def test_source_errors_name_file_entry_and_key(tmp_path: Path) -> None:
    cases = [
        ({"images": [{"hub": "t/imgs"}]}, "source.images[0]: a 'hub' source needs exactly one of"),
        ({"images": [{"url": "ftp://x/y.zip"}]}, "source.images[0]: 'url' must be http(s)"),
        ({"images": [{"hub": "t/i", "path": "a.zip", "sha256": "abc"}]}, "'sha256' must be 64 hex digits"),
        ({"images": [{"hub": "t/i", "path": "a.zip", "strip": "../x"}]}, "'strip' must be a relative folder"),
        ({"meta_file": {"hub": "t/m", "path": "m.json", "size": -1}}, "source.meta_file: 'size' must be"),
        (
            {"images": [{"manual": "Fill in the form.", "path": "sub/a.zip"}]},
            "needs 'path': the plain file name",
        ),
        ({"imagez": []}, "source: unknown keys ['imagez']"),
    ]
    for source, message in cases:
        info = _info(tmp_path, {"mine": source})
        with pytest.raises(OvisDataError) as e:
            load_registry(info)
        assert str(info) in str(e.value) and "'mine'" in str(e.value) and message in str(e.value), str(
            e.value
        )


def test_faults_cut_and_500_then_resumed(hub, tmp_path: Path) -> None:
    hub.faults["files/plain.tar"] = ["cut", "500"]  # half a body, then an error, then the rest by Range
    hub.faults["t/imgs/big.bin"] = ["500", "cut"]
    info = _info(tmp_path, {
        "url": {"images": [{"url": f"{hub.url}/files/plain.tar"}]},
        "big": {"images": [{"hub": "t/imgs", "path": "big.bin", "into": "blobs/"}]},
    })  # fmt: skip
    hub.requests.clear()
    out = _run(hub, info, tmp_path / "root")
    assert [r.status for r in out.results] == ["done", "done"], [r.detail for r in out.results]
    assert _images(tmp_path / "root/images/url") == IMGS
    assert (tmp_path / "root/images/big/blobs/big.bin").read_bytes() == (
        hub.repos / "t/imgs/big.bin"
    ).read_bytes()
    ranged = {p for m, p, rng_ in hub.requests if m == "GET" and rng_ and rng_ != "bytes=0-"}
    assert ranged == {"/files/plain.tar", "/datasets/t/imgs/resolve/main/big.bin"}  # both resumed mid-file


def test_wrong_sha256_refused_and_not_kept_others_kept(hub, tmp_path: Path) -> None:
    size = (hub.files / "plain.tar").stat().st_size
    info = _info(tmp_path, {
        "bad": {"images": [{"hub": "t/imgs", "path": "plain.zip", "sha256": "0" * 64}]},
        "good": {"images": [{"url": f"{hub.url}/files/plain.tar", "size": size}]},
    })  # fmt: skip
    out = _run(hub, info, tmp_path / "root")
    status = {r.unit.datasets[0]: r for r in out.results}
    assert status["bad"].status == "failed" and "sha256" in status["bad"].detail
    assert status["good"].status == "done" and out.exit_code == 1
    assert not list((tmp_path / "root").rglob("plain.zip"))  # the mismatching download is deleted
    assert not (tmp_path / "root/images/bad").exists() or not _images(tmp_path / "root/images/bad")


def test_members_escaping_image_dir_are_refused(hub, tmp_path: Path) -> None:
    root = tmp_path / "deep" / "root"
    info = _info(tmp_path, {"refusing": {"images": [{"hub": "t/imgs", "path": "evil.tar"}]}})
    out = _run(hub, info, root)
    (r,) = out.results
    assert r.status == "failed"
    for named in ("../../evil.txt", "/abs_evil.txt", "pics/link.jpg", "pics/null"):
        assert named in r.detail, r.detail
    written = {
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink()
    }
    assert not any(w.endswith(("evil.txt", "outside.txt")) for w in written), written
    assert not (root / "images/refusing/pics/ok.jpg").exists()  # nothing of a refused archive is placed


def test_zip_bomb_stops(hub, tmp_path: Path) -> None:
    info = _info(tmp_path, {"bomb": {"images": [{"hub": "t/imgs", "path": "bomb.zip"}]}})
    out = _run(hub, info, tmp_path / "root", max_ratio=20)
    assert out.results[0].status == "failed" and "expands past" in out.results[0].detail
    assert not list((tmp_path / "root/images").rglob("zeros.bin"))


def test_manual_step_then_finished(hub, tmp_path: Path) -> None:
    step = "Fill in the publisher's form, then download plain.tar."
    info = _info(
        tmp_path,
        {"man": {"images": [{"manual": step, "path": "plain.tar", "url": "https://x.invalid/form"}]}},
    )
    root = tmp_path / "root"
    out = _run(hub, info, root)
    where = root / "downloads" / "man" / "plain.tar"
    assert out.results[0].status == "manual" and step in out.results[0].detail
    assert str(where) in out.results[0].detail and out.exit_code == 1
    where.parent.mkdir(parents=True)
    where.write_bytes((hub.files / "plain.tar").read_bytes())
    out = _run(hub, info, root)
    assert out.exit_code == 0 and _images(root / "images/man") == IMGS


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    full.pop("HF_TOKEN", None) if "HF_TOKEN" not in (env or {}) else None
    code = "from ovis_data.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full, **kw)


def _hf_env(hub, tmp: Path) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp / "hf-home")}


def test_gated_repo_without_token_says_what_to_do(hub, tmp_path: Path) -> None:
    info = _info(tmp_path, {"gated": {"meta_file": {"hub": "t/gated", "path": "meta.json"}}})
    root = str(tmp_path / "root")
    out = _cli("get", "--dataset-info", str(info), "--root", root, env=_hf_env(hub, tmp_path))
    assert out.returncode == 1, out.stderr
    line = next(x for x in out.stderr.splitlines() if "t/gated" in x)
    assert (
        "gated" in line
        and "accept its terms" in line
        and "HF_TOKEN" in line
        and "hf auth login" in out.stderr
    )
    assert "Traceback" not in out.stderr
    out = _cli(
        "get", "--dataset-info", str(info), "--root", root, env={**_hf_env(hub, tmp_path), "HF_TOKEN": TOKEN}
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dry_run_sizes_equal_what_is_downloaded(hub, tmp_path: Path) -> None:
    info = _info(tmp_path, {
        "tgz": {"meta_file": META, "images": [TGZ]},
        "url": {"images": [{"url": f"{hub.url}/files/plain.tar"}]},
    })  # fmt: skip
    env, root = _hf_env(hub, tmp_path), str(tmp_path / "root")
    plan = tmp_path / "plan.json"
    out = _cli(
        "get", "--dataset-info", str(info), "--root", root, "--dry-run", "--report", str(plan), env=env
    )
    assert out.returncode == 0 and "disk needed" in out.stdout, out.stderr
    assert not (tmp_path / "root" / "images").exists()  # a dry run gets nothing
    report = tmp_path / "got.json"
    out = _cli("get", "--dataset-info", str(info), "--root", root, "--report", str(report), env=env)
    assert out.returncode == 0, out.stderr
    planned = {u["source"]: u["size"] for u in json.loads(plan.read_text())["units"]}
    got = {s["source"]: s["bytes_downloaded"] for s in json.loads(report.read_text())["sources"]}
    assert planned == got and all(planned.values())


def test_sigkill_mid_extract_then_rerun_gives_the_same_tree(hub, tmp_path: Path) -> None:
    info = _info(tmp_path, {"many": {"images": [{"url": f"{hub.url}/files/many.zip", "strip": "m/"}]}})
    ref = tmp_path / "ref"
    assert _run(hub, info, ref).exit_code == 0
    root = tmp_path / "root"
    args = ("get", "--dataset-info", str(info), "--root", str(root), "--no-fetch")
    full = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "from ovis_data.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=full, stdout=subprocess.DEVNULL)
    staging = root / "images" / "many" / ".get" / "staging"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if staging.is_dir() and sum(1 for _ in staging.rglob("*.jpg")) > 200:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "get finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "images/many/.get/done").exists()
    out = _cli(*args)
    assert out.returncode == 0, out.stderr
    assert _tree(root / "images") == _tree(ref / "images")
    assert not (root / "downloads").exists() and not staging.exists()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    from ovis_data.get.demo_hub import demo_hub

    with demo_hub(tmp_path_factory.mktemp("demo-hub"), stages=(3,)) as (server, info):  # a smaller corpus
        yield server, info


def test_stage3_from_an_empty_root_validates_with_no_missing_image(demo, tmp_path: Path) -> None:
    server, info = demo
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf-home")}
    root = str(tmp_path / "root")
    common = ("--stage", "3", "--dataset-info", str(info), "--root", root)
    out = _cli("get", *common, "--allow-private", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    report = tmp_path / "validate.json"
    out = _cli("validate", *common, "--meta-only", "--report", str(report), env=env)
    datasets = json.loads(report.read_text())["datasets"]
    assert set(datasets) == {n for n, s in load_registry(info).items() if s.stage == 3}
    for name, r in datasets.items():
        assert "missing_image" not in r["by_reason"] and not r.get("error"), (name, r)
    # fetch on an empty root gets the URL list from the dataset's source first, then the images
    out = _cli("fetch", "cc12m-qa-387k", "--root", str(tmp_path / "urls"), "--dataset-info", str(info),
               "--allow-private", "--processes", "1", env=env)  # fmt: skip
    assert out.returncode == 0 and "got the URL list of cc12m-qa-387k" in out.stderr, out.stderr
    assert len(list((tmp_path / "urls/images/ovis_cc12m").glob("*.jpg"))) > 5


def test_own_dataset_get_then_validate(hub, tmp_path: Path) -> None:
    size = (hub.repos / "t/imgs/plain.zip").stat().st_size
    info = _info(
        tmp_path,
        {"mine": {"meta_file": META, "images": [{"hub": "t/imgs", "path": "plain.zip", "size": size}]}},
    )
    env, root = _hf_env(hub, tmp_path), str(tmp_path / "root")
    out = _cli("list", "--dataset-info", str(info), env={"COLUMNS": "200"})
    assert f"hub, {size / 1000:.1f} KB + 1 unrecorded" in out.stdout, (
        out.stdout
    )  # the meta file's size is not recorded
    out = _cli("get", "mine", "--dataset-info", str(info), "--root", root, env=env)
    assert out.returncode == 0 and "missing images: none" in out.stdout, out.stdout + out.stderr
    report = tmp_path / "v.json"
    out = _cli(
        "validate",
        "mine",
        "--dataset-info",
        str(info),
        "--root",
        root,
        "--meta-only",
        "--report",
        str(report),
    )
    assert out.returncode == 0 and json.loads(report.read_text())["datasets"]["mine"]["good"] == len(IMGS)
