"""`pack` end to end on the demo corpus: real catalogs, real tokenizers, real tar shards."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import call, pools_started
from PIL import Image
from test_templates import by_hand_caption, by_hand_chat
from test_templates_tokenizers import llama3_tokenizer, qwen_path, qwen_tokenizer, save
from test_validate import CONV_ROWS, make_root, write_meta, write_shards

from ovis_data.errors import OvisDataError
from ovis_data.imagestore import ImageStore
from ovis_data.pack import dispatch
from ovis_data.pack import images as pack_images
from ovis_data.pack.images import resize_for_vit
from ovis_data.pack.stage import pack_stage
from ovis_data.pack.tokenize import tokenizer_identity
from ovis_data.recipes import load_recipe
from ovis_data.registry import load_registry
from ovis_data.shards import read_records
from ovis_data.validate.catalog import catalog_path, check_catalog_current
from ovis_data.validate.dataset import validate_dataset

STAGE3_TEXT_ONLY = "allava-evol-instruct-143k"


@pytest.fixture(scope="module")
def root(demo_root: Path, tmp_path_factory) -> Path:
    """A private copy of the demo corpus: pack validates into ROOT/catalogs."""
    dst = tmp_path_factory.mktemp("packroot") / "data"
    shutil.copytree(demo_root, dst)
    return dst


@pytest.fixture(scope="module")
def qwen_stage3(root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out_q")
    pack_stage(3, root, qwen_path(), out, processes=1, packs_per_shard=8)
    return out / "stage3"


def _catalog_rows(root: Path, dataset: str) -> dict[int, dict]:
    table = pq.read_table(catalog_path(root, dataset))
    return {r["row"]: r for r in table.to_pylist()}


def _shard_hashes(stage_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(stage_dir.glob("*.tar"))}


def _check_records_match_rules(stage_dir: Path, root: Path, tok, fmt: str) -> int:
    """Every sub-sample of every record is exactly its catalog sample tokenized by the rules by hand."""
    catalogs: dict[str, dict] = {}
    seen = []
    for shard in sorted(stage_dir.glob("*.tar")):
        for rec in read_records(shard):
            assert "." not in rec.key
            assert rec.input_ids.dtype == np.int32 and rec.labels.dtype == np.int32
            assert rec.lengths.sum() == len(rec.input_ids) == len(rec.labels)
            assert len(rec.images) == int((rec.input_ids == -200).sum())
            for jpg in rec.images:
                with Image.open(io.BytesIO(jpg)) as im:
                    assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) == 336
            for prov, (ids, labels) in zip(rec.meta["samples"], rec.samples(), strict=True):
                ds = prov["dataset"]
                if ds not in catalogs:
                    catalogs[ds] = _catalog_rows(root, ds)
                row = catalogs[ds][prov["row"]]
                assert row["id"] == prov["id"]
                if row["caption"] is not None:
                    want = by_hand_caption(tok, row["caption"])
                else:
                    want = by_hand_chat(tok, list(zip(row["roles"], row["texts"], strict=True)), fmt)
                assert (ids.tolist(), labels.tolist()) == want
                assert int((ids == -200).sum()) == len(row["images"] or [])
                seen.append((ds, prov["row"]))
    return len(seen)


def test_stage3_records_unpack_to_the_rules_by_hand(qwen_stage3: Path, root: Path):
    manifest = json.loads((qwen_stage3 / "manifest.json").read_text())
    n = _check_records_match_rules(qwen_stage3, root, qwen_tokenizer(), "qwen")
    assert n == manifest["samples"] == sum(d["kept"] for d in manifest["datasets"].values())
    assert manifest["template"]["chat"] == "qwen" and manifest["capacity"] == 2048
    assert manifest["visual_tokens_per_image"] == 578 and manifest["image_size"] == 336
    assert manifest["tokenizer"]["sha256"] and not (qwen_stage3 / ".work" / "tok").exists()
    records = [r for s in sorted(qwen_stage3.glob("*.tar")) for r in read_records(s)]
    assert manifest["records"] == len(records)
    tokens = [len(r.input_ids) + 577 * len(r.images) for r in records]
    assert max(tokens) <= 2048 and sum(tokens) == manifest["tokens"]
    assert manifest["fill"] == pytest.approx(sum(tokens) / (len(records) * 2048))
    for entry in manifest["shards"]:  # per-shard counts and hashes are those of the files
        shard = qwen_stage3 / entry["name"]
        assert entry["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
        assert entry["records"] == sum(1 for _ in read_records(shard))


def test_text_only_samples_carry_no_image(qwen_stage3: Path):
    for shard in sorted(qwen_stage3.glob("*.tar")):
        for rec in read_records(shard):
            for prov, (ids, _) in zip(rec.meta["samples"], rec.samples(), strict=True):
                if prov["dataset"] == STAGE3_TEXT_ONLY:
                    assert -200 not in ids.tolist()


def test_shards_read_with_plain_webdataset_and_tar(qwen_stage3: Path):
    shard = sorted(qwen_stage3.glob("*.tar"))[0]
    listing = subprocess.run(["tar", "tf", str(shard)], capture_output=True, text=True, check=True).stdout
    names = listing.split()
    assert names[0].endswith(".input_ids.npy") and names[-1].endswith(".json")
    keys = [n.split(".", 1)[0] for n in names]
    assert keys == sorted(keys)  # members of a record are adjacent
    ds = wds.WebDataset(str(shard), shardshuffle=False).decode()
    recs = list(ds)
    assert len(recs) == len(set(keys))
    ours = list(read_records(shard))
    for got, want in zip(recs, ours, strict=True):
        assert np.array_equal(got["input_ids.npy"], want.input_ids)
        assert np.array_equal(got["labels.npy"], want.labels)
        assert got["json"]["samples"] == want.meta["samples"]
        assert sum(k.startswith("img_") for k in got) == len(want.images)


def test_shard_bytes_are_those_tarfile_writes(qwen_stage3: Path):
    """The writer builds USTAR headers itself; tarfile, given the same members and fixed fields, writes
    the very same bytes (so any tar reader reads our shards as it reads tarfile's)."""
    shard = sorted(qwen_stage3.glob("*.tar"))[0]
    buf = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for m in src:
            info = tarfile.TarInfo(m.name)
            info.size, info.mtime, info.mode, info.uid, info.gid = m.size, 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tf.addfile(info, src.extractfile(m))
    assert buf.getvalue() == shard.read_bytes()


@pytest.mark.parametrize(
    ("mode", "size"),
    [
        ("RGB", (336, 200)),
        ("RGB", (200, 336)),
        ("L", (336, 100)),
        ("CMYK", (336, 90)),
        ("RGB", (500, 300)),
        ("RGB", (336, 336)),
    ],  # fmt: skip
)
def test_resize_for_vit_reads_headers_as_pil_does(mode: str, size: tuple[int, int], monkeypatch):
    """The simplejpeg header path passes through exactly the JPEGs PIL's path passes through."""
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    fast = resize_for_vit(data, 336)
    monkeypatch.setattr(pack_images, "simplejpeg", None)
    assert fast == resize_for_vit(data, 336)
    assert (fast[0] is data) == (mode == "RGB" and max(size) == 336)


def test_same_bytes_whatever_the_number_of_processes(
    qwen_stage3: Path, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    pools = pools_started(monkeypatch, dispatch)
    # pools of two processes as asked (tokenizing, writing); by default a stage this small packs in this
    # process, no pool to start
    for processes in (2, None):
        pools.clear()
        out = tmp_path / f"p{processes}"
        pack_stage(3, root, qwen_path(), out, processes=processes, packs_per_shard=8)
        assert pools == ([2, 2] if processes else []), (processes, pools)
        assert _shard_hashes(out / "stage3") == _shard_hashes(qwen_stage3)
        assert (out / "stage3" / "manifest.json").read_bytes() == (qwen_stage3 / "manifest.json").read_bytes()


def test_a_killed_pack_resumes_to_the_same_bytes(qwen_stage3: Path, root: Path, tmp_path: Path):
    class Killed(Exception):
        pass

    def kill_after_two_shards(phase: str, done: int, total: int) -> None:
        if phase == "write" and done == 16:  # records: two shards of 8
            raise Killed

    with pytest.raises(Killed):
        pack_stage(
            3, root, qwen_path(), tmp_path, processes=1, packs_per_shard=8, progress=kill_after_two_shards
        )
    stage_dir = tmp_path / "stage3"
    assert not (stage_dir / "manifest.json").exists() and len(list(stage_dir.glob("*.tar"))) == 2
    (stage_dir / "stage3-00005.tar.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves it
    written = []
    pack_stage(
        3,
        root,
        qwen_path(),
        tmp_path,
        processes=1,
        packs_per_shard=8,
        progress=lambda p, d, t: written.append((p, t)),
    )
    assert ("tokenize", 0) in written  # the token cache was reused, nothing tokenized again
    assert _shard_hashes(stage_dir) == _shard_hashes(qwen_stage3)
    assert not list(stage_dir.glob("*.tmp"))


def test_other_inputs_are_refused_unless_overwrite(qwen_stage3: Path, root: Path, tmp_path: Path):
    out = tmp_path / "o"
    shutil.copytree(qwen_stage3, out / "stage3")
    assert pack_stage(3, root, qwen_path(), out, processes=1, packs_per_shard=8)["records"]  # same: no-op
    with pytest.raises(OvisDataError, match="other inputs"):
        pack_stage(3, root, qwen_path(), out, processes=1, seed=1, packs_per_shard=8)
    m = pack_stage(3, root, qwen_path(), out, processes=1, seed=1, packs_per_shard=8, overwrite=True)
    assert m["seed"] == 1 and _shard_hashes(out / "stage3") != _shard_hashes(qwen_stage3)


def test_llama3_stage3_records_match_the_rules(root: Path, tmp_path: Path):
    tok_dir = save(llama3_tokenizer(), tmp_path / "llama3-tok")
    manifest = pack_stage(3, root, tok_dir, tmp_path / "out", processes=1, packs_per_shard=8)
    assert manifest["template"]["chat"] == "llama3"
    n = _check_records_match_rules(tmp_path / "out" / "stage3", root, llama3_tokenizer(), "llama3")
    assert n == manifest["samples"]


def write_recipe(tmp_path: Path, stage: int, weights: dict[str, float], max_length: int) -> Path:
    src = Path(__file__).resolve().parents[1] / "pipelines"
    text = (src / f"stage{stage}.toml").read_text().split("[[datasets]]")[0]
    text = text.replace(
        next(line for line in text.splitlines() if line.startswith("max_length")),
        f"max_length = {max_length}",
    )
    for name, w in weights.items():
        text += f'\n[[datasets]]\nname = "{name}"\nweight = {w}\n'
    d = tmp_path / "recipe"
    d.mkdir(exist_ok=True)
    for f in src.glob("*.json"):
        shutil.copy(f, d)
    (d / f"stage{stage}.toml").write_text(text)
    return d / f"stage{stage}.toml"


def test_captions_weights_and_drops_are_counted(root: Path, tmp_path: Path):
    recipe = write_recipe(tmp_path, 1, {"coyo-10m": 1.5}, 1024)
    validate_dataset(load_registry()["coyo-10m"], root)
    path = catalog_path(root, "coyo-10m")
    table = pq.read_table(path)
    blank = table.slice(0, 1).to_pylist()[0] | {"row": 10_000, "id": "blank", "caption": " <image>  "}
    # as a catalog of an older validate may hold it (validate now rejects it as empty_caption); the
    # parquet metadata is kept, so pack still knows which meta file the catalog came from
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist([blank], schema=table.schema)]), path)
    m = pack_stage(recipe, root, qwen_path(), tmp_path / "out", processes=1, packs_per_shard=64)
    d = m["datasets"]["coyo-10m"]
    # the weight draws from the whole catalog: the blank caption is drawn once, or twice, then dropped
    assert d["dropped"] in ({"no_label": 1}, {"no_label": 2})  # only <image> and blanks: nothing to learn
    assert d["selected"] == d["catalog"] + round(0.5 * d["catalog"]) and d["kept"] == d["catalog"] - 1
    assert d["packed"] + d["dropped"]["no_label"] == d["selected"]
    assert m["template"]["captions"] == {"coyo-10m": "<image>'s caption: "}
    assert (
        _check_records_match_rules(tmp_path / "out" / "stage1", root, qwen_tokenizer(), "qwen") == d["packed"]
    )

    recipe = write_recipe(tmp_path, 3, {"llava-finetune-665k": 1.0, STAGE3_TEXT_ONLY: 0.5}, 700)
    m = pack_stage(recipe, root, qwen_path(), tmp_path / "out3", processes=1)
    llava = m["datasets"]["llava-finetune-665k"]
    assert (
        llava["dropped"]["too_long"] > 0 and llava["kept"] + llava["dropped"]["too_long"] == llava["catalog"]
    )
    text_only = m["datasets"][STAGE3_TEXT_ONLY]
    assert text_only["selected"] == round(0.5 * text_only["catalog"])
    assert text_only["packed"] + sum(text_only["dropped"].values()) == text_only["selected"]
    assert m["dropped"]["too_long"] == sum(x["dropped"].get("too_long", 0) for x in m["datasets"].values())


def test_a_catalog_whose_meta_file_changed_is_refused(root: Path, tmp_path: Path):
    copy = tmp_path / "data"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("images"))
    (copy / "images").symlink_to(root / "images")
    recipe = write_recipe(tmp_path, 1, {"coyo-10m": 1.0}, 1024)
    spec = load_registry()["coyo-10m"]
    validate_dataset(spec, copy, mode="meta")
    meta, catalog = spec.meta_path(copy), catalog_path(copy, "coyo-10m")
    os.utime(meta, ns=(1, 1))  # touched, or copied: same bytes, so not stale
    check_catalog_current(catalog, "coyo-10m", meta)
    meta.write_bytes(meta.read_bytes().replace(b"a", b"b", 1))  # same size, other content
    with pytest.raises(OvisDataError, match=r"coyo-10m.*stale.*re-run `ovis-data validate coyo-10m`"):
        pack_stage(recipe, copy, qwen_path(), tmp_path / "out", processes=1)
    table = pq.read_table(catalog)
    pq.write_table(table.replace_schema_metadata(None), catalog)  # as an older version wrote it
    with pytest.raises(OvisDataError, match=r"does not record its meta file.*re-run `ovis-data validate"):
        check_catalog_current(catalog, "coyo-10m", meta)
    assert not (tmp_path / "out" / "stage1").exists()


def test_a_corpus_with_every_defect_packs_only_good_samples(tmp_path: Path):
    """One of each bad sample and bad caption beside good ones: only the good are packed, each exactly as
    the rules give from its meta row; an image lost after validation is a counted drop, so per dataset
    selected = packed + dropped, and the datasets come in a stable order."""
    root, info = make_root(tmp_path)
    write_meta(root)
    conv = [s for s, _ in CONV_ROWS] + [3.5, None, "a string", [CONV_ROWS[0][0]]]
    (root / "meta_files" / "conv.json").write_text(json.dumps(conv))
    caps = ["A red square <image> here.", "Dark.", "  \n\t ", " <image> ", "fine", "gone"]
    paths = ["a.jpg", "c.jpg", "a.jpg", "a.jpg", None, "nope.jpg"]
    pq.write_table(pa.table({"image_path": paths, "caption": caps}), root / "meta_files" / "caps.parquet")
    registry = load_registry(info)
    good = {}
    for name in ("conv", "caps", "text"):
        res = validate_dataset(registry[name], root, processes=1)
        good[name] = {r["row"] for r in pq.read_table(catalog_path(root, name)).to_pylist()}
        assert res.good == len(good[name]) and res.bad > 0
    assert good["caps"] == {0, 1} and good["conv"] == {0, 1, 2, 3, 4}
    (root / "images" / "set" / "c.jpg").unlink()  # gone since validation: ok2 and caps row 1 use it
    recipe = write_recipe(tmp_path, 3, {"text": 1.0, "conv": 1.0, "caps": 1.0}, 1024)
    m = pack_stage(
        recipe, root, qwen_path(), tmp_path / "out", processes=1, visual_tokens=6, registry=registry
    )
    assert list(m["datasets"]) == ["caps", "conv", "text"]
    for name, d in m["datasets"].items():
        assert d["selected"] == d["packed"] + sum(d["dropped"].values()), name
    assert m["datasets"]["conv"]["dropped"] == {"image_unreadable": 1}
    assert m["datasets"]["caps"]["dropped"] == {"image_unreadable": 1}
    assert m["dropped"] == {"image_unreadable": 2}
    n = _check_records_match_rules(tmp_path / "out" / "stage3", root, qwen_tokenizer(), "qwen")
    assert n == m["samples"] == sum(len(g) for g in good.values()) - 2
    packed = {
        (p["dataset"], p["row"])
        for shard in sorted((tmp_path / "out" / "stage3").glob("*.tar"))
        for rec in read_records(shard)
        for p in rec.meta["samples"]
    }
    assert packed == {(d, r) for d, rows in good.items() for r in rows} - {("conv", 1), ("caps", 1)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ovis_data", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_pack_and_inspect(
    qwen_stage3: Path,
    root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    """pack as a real process; inspect and a bad --tokenizer through the same entry point in this process
    (its output not a terminal, as in a pipe)."""
    r = _cli(
        "pack",
        "--stage",
        "2",
        "--root",
        str(root),
        "--tokenizer",
        qwen_path(),
        "--out",
        str(tmp_path),
        "--processes",
        "1",
        "--visual-tokens",
        "6",
        "--image-size",
        "28",
    )
    assert r.returncode == 0, r.stderr
    assert "fill" in r.stdout and (tmp_path / "stage2" / "manifest.json").exists()
    manifest = json.loads((tmp_path / "stage2" / "manifest.json").read_text())
    assert (manifest["visual_tokens_per_image"], manifest["image_size"]) == (6, 28)
    shard = sorted(qwen_stage3.glob("*.tar"))[0]
    code, out, err = call(capsys, monkeypatch, "ovis-data", "inspect", str(shard), "--record", "1", "--json")
    assert code == 0, err
    view = json.loads(out)
    rec = list(read_records(shard))[1]
    assert [s["id"] for s in view["samples"]] == [s["id"] for s in rec.meta["samples"]]
    tok = qwen_tokenizer()
    for s, (ids, labels) in zip(view["samples"], rec.samples(), strict=True):
        supervised = "".join(g["text"] for g in s["segments"] if g.get("supervised"))
        assert supervised == tok.decode(ids[labels != -100])
        assert sum("image" in g for g in s["segments"]) == int((ids == -200).sum())
    code, out, _ = call(capsys, monkeypatch, "ovis-data", "inspect", str(shard), "--record", "1")
    assert code == 0 and "IMAGE 0" in out and view["samples"][0]["dataset"] in out
    first = next(g["text"] for g in view["samples"][0]["segments"] if g.get("supervised"))
    assert f"[[{first[:20]}" in out  # piped, no colour: supervised text marked in plain text
    code, _, err = call(
        capsys, monkeypatch, "ovis-data", "pack", "--stage", "3", "--root", str(root), "--tokenizer",
        str(tmp_path / "nope"), "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 2 and "nope" in err


def _set_recipe_keys(recipe: Path, **values) -> Path:
    lines = recipe.read_text().splitlines()
    for key, value in values.items():
        lines = [line for line in lines if not line.startswith(f"{key} ")]
        if value is not None:
            lines.insert(1, f"{key} = {value}")
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


SMALL_MIX = {"llava-finetune-665k": 1.0, "scienceqa-train-val-17k": 1.0, STAGE3_TEXT_ONLY: 1.0}


def test_visual_tokens_and_image_size_from_flags_and_recipe(root: Path, tmp_path: Path):
    recipe = _set_recipe_keys(write_recipe(tmp_path, 3, SMALL_MIX, 256), visual_tokens=7, image_size=32)
    m = pack_stage(recipe, root, qwen_path(), tmp_path / "flags", visual_tokens=6, image_size=28, processes=1)
    assert (m["visual_tokens_per_image"], m["image_size"]) == (6, 28)  # the flags win over the recipe
    stage_dir = tmp_path / "flags" / "stage3"
    n_images = 0
    for entry in m["shards"]:
        records = list(read_records(stage_dir / entry["name"]))
        assert (
            len(entry["record_tokens"]) == len(entry["record_supervised"]) == entry["records"] == len(records)
        )
        assert entry["record_tokens"] == [r.meta["tokens"] for r in records]
        assert entry["record_tokens"] == [len(r.input_ids) + 5 * len(r.images) for r in records]
        assert sum(entry["record_tokens"]) == entry["tokens"]
        # Recounted sub-sample by sub-sample: a target is labels[t] for t >= 1 within one sub-sample.
        recount = [sum(int((lab[1:] != -100).sum()) for _, lab in r.samples()) for r in records]
        assert entry["record_supervised"] == recount and all(n > 0 for n in recount)
        for r in records:
            n_images += len(r.images)
            for jpg in r.images:
                with Image.open(io.BytesIO(jpg)) as im:
                    assert max(im.size) == 28
    assert n_images > 0 and max(t for e in m["shards"] for t in e["record_tokens"]) <= 256
    assert (
        sum(len(r.lengths) for e in m["shards"] for r in read_records(stage_dir / e["name"])) > m["records"]
    )

    m = pack_stage(recipe, root, qwen_path(), tmp_path / "recipe", processes=1)  # None: the recipe's values
    assert (m["visual_tokens_per_image"], m["image_size"]) == (7, 32)
    records = [r for e in m["shards"] for r in read_records(tmp_path / "recipe" / "stage3" / e["name"])]
    assert [t for e in m["shards"] for t in e["record_tokens"]] == [
        len(r.input_ids) + 6 * len(r.images) for r in records
    ]
    with pytest.raises(OvisDataError, match="visual_tokens must be a positive integer"):
        pack_stage(recipe, root, qwen_path(), tmp_path / "bad", visual_tokens=0)


def test_manifest_of_an_older_version_is_completed(root: Path, tmp_path: Path):
    recipe = _set_recipe_keys(
        write_recipe(tmp_path, 3, {STAGE3_TEXT_ONLY: 1.0}, 512), visual_tokens=6, image_size=28
    )
    m = pack_stage(recipe, root, qwen_path(), tmp_path, processes=1, packs_per_shard=4)
    stage_dir = tmp_path / "stage3"
    hashes = _shard_hashes(stage_dir)
    # As an older version left them: no per-record lists, no vocabulary hash.
    old = json.loads(json.dumps(m))
    del old["tokenizer"]["vocab_sha256"]
    for entry in old["shards"]:
        del entry["record_tokens"], entry["record_supervised"]
    (stage_dir / "manifest.json").write_text(json.dumps(old))
    for p in (stage_dir / ".work" / "shards").glob("*.json"):
        st = json.loads(p.read_text())
        del st["record_tokens"], st["record_supervised"]
        p.write_text(json.dumps(st))
    again = pack_stage(recipe, root, qwen_path(), tmp_path, processes=1, packs_per_shard=4)
    assert again == m and _shard_hashes(stage_dir) == hashes


def test_manifest_names_the_vocabulary(qwen_stage3: Path):
    manifest = json.loads((qwen_stage3 / "manifest.json").read_text())
    identity = tokenizer_identity(qwen_path())
    assert manifest["tokenizer"]["vocab_sha256"] == identity["vocab_sha256"]
    assert manifest["tokenizer"]["sha256"] == identity["sha256"]


@pytest.mark.parametrize("key", ["visual_tokens", "image_size"])
@pytest.mark.parametrize("value", ["0", "-578", '"578"', "578.0", "true"])
def test_recipe_visual_tokens_and_image_size_must_be_positive_integers(tmp_path: Path, key: str, value: str):
    recipe = _set_recipe_keys(write_recipe(tmp_path, 1, {"coyo-10m": 1.0}, 1024), **{key: value})
    with pytest.raises(OvisDataError, match=rf"stage1\.toml: {key} must be a positive integer"):
        load_recipe(recipe, load_registry())
    default = load_recipe(_set_recipe_keys(recipe, **{key: None}), load_registry())
    assert (default.visual_tokens, default.image_size) == (578, 336)  # absent: CLIP ViT-L/14-336's


def test_a_shards_store_packs_to_the_same_bytes_as_its_files(root: Path, tmp_path: Path, monkeypatch):
    """coyo-10m's images in the shards layout, as fetch writes them: the shard writers look them up in a
    sorted copy of the index read by pread (never the 10M-row index loaded in each worker) and write the
    very bytes the files layout gives."""
    recipe = write_recipe(tmp_path, 1, {"coyo-10m": 1.0}, 1024)
    spec = load_registry()["coyo-10m"]
    roots = {layout: tmp_path / layout for layout in ("files", "shards")}
    for r in roots.values():
        shutil.copytree(root, r, ignore=shutil.ignore_patterns("images", "catalogs"))
    (roots["files"] / "images").symlink_to(root / "images")
    files = root / "images" / spec.image_dir
    images = {p.relative_to(files).as_posix(): p.read_bytes() for p in files.rglob("*") if p.is_file()}
    write_shards(roots["shards"] / "images" / spec.image_dir, images, per_shard=16)
    mapped, map_index = [], ImageStore.map_index

    def spy(self: ImageStore, path: Path) -> None:
        mapped.append(path)
        map_index(self, path)

    monkeypatch.setattr(ImageStore, "map_index", spy)
    hashes = {}
    for layout, r in roots.items():
        validate_dataset(spec, r)
        m = pack_stage(recipe, r, qwen_path(), tmp_path / f"out_{layout}", processes=1, packs_per_shard=8)
        hashes[layout] = _shard_hashes(tmp_path / f"out_{layout}" / "stage1")
        assert m["datasets"]["coyo-10m"]["packed"] > 0 and not m["dropped"].get("image_unreadable")
    assert hashes["shards"] == hashes["files"] and len(hashes["files"]) > 1
    assert mapped and all(p.name == "coyo-10m.arrow" for p in mapped)
