"""validate on real files: every reason, every meta-file form, both image layouts."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import call, pools_started
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ovis_data.constants import clean_caption
from ovis_data.errors import OvisDataError
from ovis_data.imagestore import ImageStore, build_index, unsafe_path_reason, unsafe_path_sql
from ovis_data.registry import load_registry
from ovis_data.validate import imagecheck
from ovis_data.validate.bad_samples_report import write_report
from ovis_data.validate.catalog import read_catalog, rejected_path
from ovis_data.validate.dataset import validate_dataset
from ovis_data.validate.imagecheck import ImageLimits

UNSAFE_PATHS = {
    "": "empty path",
    "a.jpg": None,
    "/etc/passwd": "absolute path",
    "\\share\\x.jpg": "absolute path",
    "C:x.jpg": "absolute path",
    "1:x.jpg": None,  # a drive is a letter
    "a/../b.jpg": "'..' segment",
    "..": "'..' segment",
    "a\\..\\b.jpg": "'..' segment",
    "a/..b.jpg": None,
    "a/.../b.jpg": None,
    "a\x00b.jpg": "NUL byte in path",
    "../a\x00": "NUL byte in path",  # the first rule that applies
    "\n": None,
    "a/..\n": None,  # a name "..\n" is no parent
    "it's.jpg": None,
}


def _unsafe_in_duckdb(paths: list[str]) -> dict[str, str | None]:
    rows = duckdb.execute(
        f"SELECT p, {unsafe_path_sql('p')} FROM (SELECT unnest($paths) AS p)", {"paths": paths}
    )
    return dict(rows.fetchall())


def test_unsafe_path_rule_is_one_in_python_and_in_duckdb():
    """validate (SQL over millions of paths) and fetch/the readers (Python, one path) refuse the same paths
    for the same reason: both are made from imagestore.UNSAFE_PATH_RULES."""
    assert {p: unsafe_path_reason(p) for p in UNSAFE_PATHS} == UNSAFE_PATHS
    assert _unsafe_in_duckdb(list(UNSAFE_PATHS)) == UNSAFE_PATHS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="a./\\:C\x00\n'", max_size=8), min_size=1, max_size=40))
def test_unsafe_path_rule_agrees_on_any_path(paths: list[str]):
    assert _unsafe_in_duckdb(paths) == {p: unsafe_path_reason(p) for p in paths}


def jpeg(w: int = 64, h: int = 48, color=(200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png(w: int = 40, h: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (w, h), (0, 120, 0, 128)).save(buf, "PNG")
    return buf.getvalue()


def corrupt_png() -> bytes:
    """A PNG whose header and IEND chunk are intact but whose compressed pixel data is garbage."""
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(buf, "PNG")
    b = bytearray(buf.getvalue())
    start = b.index(b"IDAT") + 40
    b[start : start + 200] = bytes(range(200))
    return bytes(b)


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def make_root(tmp_path: Path) -> tuple[Path, Path]:
    """A root with one dataset of each form; returns (root, dataset_info path)."""
    root = tmp_path / "root"
    imgs = root / "images" / "set"
    (imgs / "sub").mkdir(parents=True)
    (root / "meta_files").mkdir()
    (imgs / "a.jpg").write_bytes(jpeg())
    (imgs / "sub" / "b.png").write_bytes(png())
    (imgs / "c.jpg").write_bytes(jpeg(100, 80, (1, 2, 3)))
    (imgs / "empty.jpg").write_bytes(b"")
    (imgs / "page.jpg").write_text("<html><body>not found</body></html>")
    good = jpeg(300, 200)
    (imgs / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (imgs / "corrupt.png").write_bytes(corrupt_png())
    Image.new("1", (12000, 8000)).save(imgs / "bomb.png")
    (imgs / "tiny.jpg").write_bytes(jpeg(4, 4))
    (imgs / "banner.jpg").write_bytes(jpeg(400, 20))
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg())
    os.symlink(secret, imgs / "link_out.jpg")
    os.symlink(imgs / "a.jpg", imgs / "link_in.jpg")
    info = {
        "conv": {"meta_file": "conv.json", "image_dir": "set", "data_format": "conversation", "stage": 3},
        "lines": {"meta_file": "lines.jsonl", "image_dir": "set", "data_format": "conversation", "stage": 3},
        "caps": {"meta_file": "caps.parquet", "image_dir": "set", "data_format": "caption", "stage": 1},
        "text": {"meta_file": "text.json", "image_dir": None, "data_format": "conversation", "stage": 3},
        "nodir": {
            "meta_file": "nodir.json",
            "image_dir": "absent",
            "data_format": "conversation",
            "stage": 3,
        },
        "nometa": {"meta_file": "nometa.json", "image_dir": "set", "data_format": "conversation", "stage": 3},
    }
    path = tmp_path / "info.json"
    path.write_text(json.dumps(info))
    return root, path


CONV_ROWS = [
    # (sample, expected reason or None)
    ({"id": "ok1", "image": "a.jpg", "conversations": [human("<image>\nWhat?"), gpt("A red square.")]}, None),
    (
        {
            "id": "ok2",
            "image": ["sub/b.png", "./c.jpg"],
            "conversations": [
                {"from": "system", "value": "Be brief."},
                human("<image> and <image>: differ?"),
                gpt("Yes."),
                human("Sure?"),
                gpt("Yes!"),
            ],
        },
        None,
    ),
    ({"id": 17, "image": ["link_in.jpg"], "conversations": [human("<image>"), gpt("ok")]}, None),
    ({"id": "t1", "conversations": [human("Hi"), gpt("Hello")]}, None),
    ({"id": "numval", "conversations": [human("hi"), gpt(42)]}, None),  # a number is read as its text
    ({"id": "turnnum", "conversations": [human("hi"), 5]}, "bad_type"),  # a turn must be an object
    ({"id": "turnstr", "conversations": ["hi", gpt("x")]}, "bad_type"),
    ({"id": "convobj", "conversations": {"from": "human", "value": "x"}}, "bad_type"),
    ({"id": "vlist", "conversations": [human("hi"), gpt(["stop", "second part"])]}, "bad_type"),
    ({"id": "vobj", "conversations": [human("hi"), gpt({"text": "x"})]}, "bad_type"),
    ({"id": "vnull", "conversations": [human("hi"), gpt(None)]}, "bad_type"),
    ({"id": "vbool", "conversations": [human(True), gpt("x")]}, "bad_type"),
    ({"id": "nofield", "image": "a.jpg"}, "missing_field"),
    (
        {"id": "noval", "image": "a.jpg", "conversations": [human("<image>"), {"from": "gpt"}]},
        "missing_field",
    ),
    ({"id": "strconv", "conversations": "hello"}, "bad_type"),
    ({"id": "numimg", "image": 7, "conversations": [human("<image>"), gpt("x")]}, "bad_type"),
    ({"id": "empty", "image": "a.jpg", "conversations": []}, "empty_conversation"),
    (
        {
            "id": "role",
            "image": "a.jpg",
            "conversations": [human("<image>"), {"from": "assistant", "value": "x"}],
        },
        "unknown_role",
    ),
    (
        {"id": "marks", "image": ["a.jpg", "c.jpg"], "conversations": [human("<image> only one"), gpt("x")]},
        "image_marker_mismatch",
    ),
    (
        {"id": "nomark", "image": "a.jpg", "conversations": [human("no marker"), gpt("x")]},
        "image_marker_mismatch",
    ),
    ({"id": "ok1", "image": "a.jpg", "conversations": [human("<image>"), gpt("dup")]}, "duplicate_id"),
    ({"id": "abs", "image": "/etc/passwd", "conversations": [human("<image>"), gpt("x")]}, "unsafe_path"),
    (
        {"id": "dots", "image": "sub/../../secret.jpg", "conversations": [human("<image>"), gpt("x")]},
        "unsafe_path",
    ),
    ({"id": "link", "image": "link_out.jpg", "conversations": [human("<image>"), gpt("x")]}, "unsafe_path"),
    ({"id": "miss", "image": "nope.jpg", "conversations": [human("<image>"), gpt("x")]}, "missing_image"),
    ({"id": "zero", "image": "empty.jpg", "conversations": [human("<image>"), gpt("x")]}, "empty_file"),
    ({"id": "html", "image": "page.jpg", "conversations": [human("<image>"), gpt("x")]}, "not_an_image"),
    ({"id": "trunc", "image": "trunc.jpg", "conversations": [human("<image>"), gpt("x")]}, "truncated_image"),
    (
        {"id": "bomb", "image": "bomb.png", "conversations": [human("<image>"), gpt("x")]},
        "decompression_bomb",
    ),
    (
        {
            "id": "second_bad",
            "image": ["a.jpg", "nope2.jpg"],
            "conversations": [human("<image><image>"), gpt("x")],
        },
        "missing_image",
    ),
]


def write_meta(root: Path) -> None:
    meta = root / "meta_files"
    (meta / "conv.json").write_text(json.dumps([s for s, _ in CONV_ROWS]))
    (meta / "lines.jsonl").write_text("\n".join(json.dumps(s) for s, _ in CONV_ROWS[:4]) + "\n")
    (meta / "text.json").write_text(
        json.dumps(
            [
                {"id": "a", "conversations": [human("Tell me a joke"), gpt("No.")]},
                {"id": "b", "image": "a.jpg", "conversations": [human("<image>"), gpt("x")]},
            ]
        )
    )
    (meta / "nodir.json").write_text(json.dumps([CONV_ROWS[0][0], CONV_ROWS[3][0]]))
    pq.write_table(
        pa.table(
            {
                "image_path": ["a.jpg", "c.jpg", "c.jpg", None, "nope.jpg"],
                "caption": ["A red square <image> here.", "Dark.", "  ", "no image", "gone"],
                "image_url": ["http://x/a.jpg"] * 5,
            }
        ),
        meta / "caps.parquet",
    )


@pytest.fixture
def root_info(tmp_path: Path) -> tuple[Path, dict]:
    root, info = make_root(tmp_path)
    write_meta(root)
    return root, load_registry(info)


def rejected(root: Path, name: str) -> dict[str, str]:
    table = pq.read_table(rejected_path(root, name)).to_pylist()
    return {r["id"]: r["reason"] for r in table}


@pytest.mark.parametrize(("mode", "processes"), [("header", 2), ("deep", 2), ("header", None)])
def test_every_conversation_reason(root_info, mode, processes, monkeypatch):
    root, reg = root_info
    pools = pools_started(monkeypatch, imagecheck)
    result = validate_dataset(reg["conv"], root, mode=mode, processes=processes)
    # a pool where the user asked for one; by default a set this small is checked in this process
    assert pools == ([processes] if processes else [])
    expected_bad = {s["id"] if isinstance(s["id"], str) else str(s["id"]): r for s, r in CONV_ROWS if r}
    got = rejected(root, "conv")
    assert got == expected_bad
    assert result.total == len(CONV_ROWS)
    assert result.good == 5 and result.bad == len(expected_bad)
    assert sum(result.by_reason.values()) == result.bad
    cat = read_catalog(root, "conv").to_pylist()
    assert [r["id"] for r in cat] == ["ok1", "ok2", "17", "t1", "numval"]
    assert cat[4]["texts"] == ["hi", "42"]
    two = cat[1]
    assert (
        two["images"] == ["sub/b.png", "c.jpg"] and two["widths"] == [40, 100] and two["heights"] == [30, 80]
    )
    assert two["roles"] == ["system", "human", "gpt", "human", "gpt"]
    assert cat[3]["images"] == [] and cat[3]["texts"] == ["Hi", "Hello"]
    assert [r["row"] for r in cat] == [0, 1, 2, 3, 4]


def test_deep_mode_catches_corrupt_data_that_headers_miss(root_info):
    root, reg = root_info
    meta = root / "meta_files" / "conv.json"
    meta.write_text(
        json.dumps([{"id": "c", "image": "corrupt.png", "conversations": [human("<image>"), gpt("x")]}])
    )
    assert validate_dataset(reg["conv"], root, mode="header").bad == 0
    deep = validate_dataset(reg["conv"], root, mode="deep", processes=1)
    assert deep.by_reason == {"decode_error": 1}


def test_size_and_aspect_limits(root_info):
    root, reg = root_info
    meta = root / "meta_files" / "conv.json"
    rows = [
        {"id": n, "image": f, "conversations": [human("<image>"), gpt("x")]}
        for n, f in (("t", "tiny.jpg"), ("b", "banner.jpg"), ("a", "a.jpg"))
    ]
    meta.write_text(json.dumps(rows))
    res = validate_dataset(reg["conv"], root, limits=ImageLimits(min_side=8, max_aspect=10.0))
    assert rejected(root, "conv") == {"t": "image_too_small", "b": "extreme_aspect_ratio"}
    assert res.good == 1


def test_meta_only_mode_opens_no_image(root_info):
    root, reg = root_info
    res = validate_dataset(reg["conv"], root, mode="meta")
    got = rejected(root, "conv")
    # Existence and safety are still checked; content problems need header or deep mode.
    assert got["miss"] == "missing_image" and got["link"] == "unsafe_path"
    assert "zero" not in got and "html" not in got and "bomb" not in got
    assert read_catalog(root, "conv").column("widths").to_pylist()[0] is None
    assert res.total == len(CONV_ROWS)


def test_json_lines_caption_and_text_only_forms(root_info):
    root, reg = root_info
    lines = validate_dataset(reg["lines"], root)
    assert (lines.total, lines.good) == (4, 4)
    caps = validate_dataset(reg["caps"], root)
    assert caps.by_reason == {"empty_caption": 1, "missing_field": 1, "missing_image": 1}
    cat = read_catalog(root, "caps").to_pylist()
    assert [(r["images"], r["caption"], r["id"]) for r in cat] == [
        (["a.jpg"], "A red square <image> here.", "caps-0"),
        (["c.jpg"], "Dark.", "caps-1"),
    ]
    text = validate_dataset(reg["text"], root)
    assert text.by_reason == {"unexpected_image": 1} and text.good == 1


def test_missing_meta_file_or_image_dir_is_reported_per_dataset(root_info):
    root, reg = root_info
    nometa = validate_dataset(reg["nometa"], root)
    assert nometa.error.startswith("meta_file_missing") and nometa.total == 0
    nodir = validate_dataset(reg["nodir"], root)
    assert nodir.error.startswith("image_dir_missing")
    assert nodir.by_reason == {"image_dir_missing": 1} and nodir.good == 1  # the text-only sample is fine


BROKEN_META = [
    # (file name, content, reason, detail pattern)
    (
        "conv.json",
        '[\n {"id": "a", "conversations": []},\n {"id": "b",, }\n]',
        "meta_file_malformed",
        r"malformed JSON list: line 3 column 13: Expecting property name",
    ),
    (
        "conv.jsonl",
        '{"id": "a", "conversations": []}\n\n{"id": "b" "x": 1}\n',
        "meta_file_malformed",
        r"malformed JSON lines: line 3 column 12: Expecting ',' delimiter",
    ),
    ("conv.json", "[1, 2.5, 3]", "meta_file_malformed", r"none of its 3 entries is an object with any of"),
    ("conv.json", '{"a": {"id": "x"}, "b": {"id": "y"}}', "meta_file_malformed", r"none of its 1 entries"),
    ("conv.json", "", "meta_file_empty", r"the file is empty \(0 bytes\)"),
    ("conv.json", " [ ] \n", "meta_file_empty", r"the file holds no samples"),
    ("conv.parquet", b"PAR1 not really", "meta_file_malformed", r"not a readable parquet file"),
    (
        "conv.parquet",
        {"id": ["a"], "text": ["hi"]},
        "meta_file_malformed",
        r"parquet lacks column\(s\) conversations \(has: id, text\)",
    ),
]


@pytest.mark.parametrize(("name", "content", "reason", "detail"), BROKEN_META)
def test_an_unusable_meta_file_is_reported_for_its_dataset_only(
    tmp_path: Path, name, content, reason, detail
):
    root, info_path = make_root(tmp_path)
    write_meta(root)
    info = json.loads(info_path.read_text())
    info["conv"]["meta_file"] = name
    info_path.write_text(json.dumps(info))
    reg = load_registry(info_path)
    validate_dataset(reg["conv"], root, mode="meta")  # an earlier good run's catalogs
    before = {p.name: p.read_bytes() for p in (root / "catalogs").glob("conv*")}
    path = root / "meta_files" / name
    if isinstance(content, dict):
        pq.write_table(pa.table(content), path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    res = validate_dataset(reg["conv"], root, mode="meta")
    assert res.error is not None and res.error.startswith(f"{reason}: {path}: ")
    assert re.search(detail, res.error), res.error
    assert "duckdb" not in res.error.lower() and "Error" not in res.error
    assert not res.catalog_written and (res.total, res.good) == (0, 0)
    # the dataset's catalogs are left as they were; other datasets validate as usual
    assert {p.name: p.read_bytes() for p in (root / "catalogs").glob("conv*")} == before
    lines = validate_dataset(reg["lines"], root, mode="meta")
    assert lines.error is None and lines.good == 4 and read_catalog(root, "lines").num_rows == 4


def test_validate_goes_on_past_a_broken_meta_file_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    root, info = make_root(tmp_path)
    write_meta(root)
    (root / "meta_files" / "conv.json").write_text("[{]")
    report = tmp_path / "r.json"
    args = ["validate", "conv", "lines", "--root", str(root), "--dataset-info", str(info), "--meta-only"]
    code, out, err = call(capsys, monkeypatch, "ovis-data", *args, "--report", str(report))  # in this process
    assert code == 1, out + err
    assert "Traceback" not in err
    data = json.loads(report.read_text())
    assert data["datasets"]["conv"]["error"].startswith("meta_file_malformed: ")
    assert "line 1 column 3" in data["datasets"]["conv"]["error"]
    assert data["datasets"]["lines"]["good"] == 4 and read_catalog(root, "lines").num_rows == 4
    assert not (root / "catalogs" / "conv.parquet").exists()
    stage5 = call(capsys, monkeypatch, "ovis-data", *args[:3], "--stage", "5", *args[3:])
    assert stage5[0] == 2  # a stage that does not exist


def test_samples_that_are_not_objects_are_bad_samples(tmp_path: Path):
    """Among the samples of a JSON list or JSON-lines file, a number, null, a string or a list is one
    bad sample with its row named; the good samples around it are catalogued."""
    root, info = make_root(tmp_path)
    reg = load_registry(info)
    ok = {"id": "ok", "conversations": [human("hi"), gpt("yes")]}
    samples = [ok, 3.5, None, "a string", [ok], {**ok, "id": "ok2"}, True]
    (root / "meta_files" / "conv.json").write_text(json.dumps(samples))
    (root / "meta_files" / "lines.jsonl").write_text("\n".join(json.dumps(x) for x in samples) + "\n")
    for name in ("conv", "lines"):
        res = validate_dataset(reg[name], root, mode="meta")
        assert (res.total, res.good, res.by_reason) == (7, 2, {"bad_type": 5})
        rej = pq.read_table(rejected_path(root, name)).to_pylist()
        assert [(r["row"], r["id"], r["detail"]) for r in rej] == [
            (1, f"{name}-1", "the sample is a number, not an object"),
            (2, f"{name}-2", "the sample is null, not an object"),
            (3, f"{name}-3", "the sample is a string, not an object"),
            (4, f"{name}-4", "the sample is a list, not an object"),
            (6, f"{name}-6", "the sample is a boolean, not an object"),
        ]
        assert [r["id"] for r in read_catalog(root, name).to_pylist()] == ["ok", "ok2"]


def test_turn_and_field_types_are_named_in_the_detail(root_info):
    root, reg = root_info
    validate_dataset(reg["conv"], root, mode="meta")
    detail = {r["id"]: r["detail"] for r in pq.read_table(rejected_path(root, "conv")).to_pylist()}
    assert detail["vlist"] == 'conversations[1] "value" is a list, not text'
    assert detail["vobj"] == 'conversations[1] "value" is an object, not text'
    assert detail["vnull"] == 'conversations[1] "value" is null, not text'
    assert detail["vbool"] == 'conversations[0] "value" is a boolean, not text'
    assert detail["turnnum"] == "conversations[1] is a number, not an object"
    assert detail["turnstr"] == "conversations[0] is a string, not an object"
    assert detail["convobj"] == '"conversations" is an object, not a list'
    assert detail["numimg"] == '"image" is a number, not a string or a list of strings'
    assert detail["noval"] == 'conversations[1] has no "value"'


def test_captions_blank_once_cleaned_are_empty_captions(tmp_path: Path):
    """The rule pack applies (constants.clean_caption): <image> removed, surrounding white space stripped."""
    root, info = make_root(tmp_path)
    caps = ["ok", "  \n\t ", "<image>", " <image>\u3000<image> ", "\u2003", "<image>x", "<im<image>age>", ""]
    pq.write_table(
        pa.table({"image_path": ["a.jpg"] * len(caps), "caption": caps}), root / "meta_files" / "caps.parquet"
    )
    validate_dataset(load_registry(info)["caps"], root, mode="meta")
    got = {r["row"]: r["reason"] for r in pq.read_table(rejected_path(root, "caps")).to_pylist()}
    assert got == {i: "empty_caption" for i, c in enumerate(caps) if not clean_caption(c)}
    assert sorted(got) == [1, 2, 3, 4, 7]
    assert [r["caption"] for r in read_catalog(root, "caps").to_pylist()] == [
        "ok",
        "<image>x",
        "<im<image>age>",
    ]


def write_shards(image_dir: Path, images: dict[str, bytes], per_shard: int = 2) -> None:
    """The shards layout as fetch (or img2dataset) writes it: tar + parquet + _stats.json marker."""
    image_dir.mkdir(parents=True)
    items = sorted(images.items())
    for s in range(0, len(items), per_shard):
        name = f"{s // per_shard:05d}"
        with tarfile.open(image_dir / f"{name}.tar", "w") as tf:
            for k, (path, data) in enumerate(items[s : s + per_shard]):
                key = f"{name}{k:04d}"
                for ext, payload in (("jpg", data), ("json", json.dumps({"image_path": path}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        (image_dir / f"{name}_stats.json").write_text("{}")


def test_shards_layout_is_read_through_the_index(tmp_path: Path):
    root = tmp_path / "root"
    (root / "meta_files").mkdir(parents=True)
    good = jpeg(50, 70)
    write_shards(
        root / "images" / "set", {"x/1.jpg": good, "x/2.jpg": jpeg(20, 10), "x/3.jpg": good[: len(good) // 2]}
    )
    rows = [
        {"id": str(i), "image": f"x/{i}.jpg", "conversations": [human("<image>"), gpt("x")]}
        for i in (1, 2, 3, 4)
    ]
    (root / "meta_files" / "m.json").write_text(json.dumps(rows))
    info = tmp_path / "info.json"
    info.write_text(
        json.dumps(
            {"m": {"meta_file": "m.json", "image_dir": "set", "data_format": "conversation", "stage": 3}}
        )
    )
    spec = load_registry(info)["m"]
    res = validate_dataset(spec, root, processes=2)
    assert res.by_reason == {"missing_image": 1, "truncated_image": 1}
    cat = read_catalog(root, "m").to_pylist()
    assert [(r["images"], r["widths"], r["heights"]) for r in cat] == [
        (["x/1.jpg"], [50], [70]),
        (["x/2.jpg"], [20], [10]),
    ]
    store = ImageStore(root / "images" / "set")
    assert store.layout == "shards" and store.read_bytes("x/1.jpg") == good
    assert store.read_bytes("x/3.jpg") == good[: len(good) // 2]  # second shard, found by bisection
    with pytest.raises(FileNotFoundError):
        store.read_bytes("x/0.jpg")  # sorts before every indexed path
    with pytest.raises(FileNotFoundError):
        store.read_bytes("x/4.jpg")
    assert build_index(root / "images" / "set").num_rows == 3


def test_demo_corpus_catches_each_planted_fault(demo_root: Path, tmp_path: Path):
    reg = load_registry()
    found = {}
    for spec in reg.values():
        res = validate_dataset(spec, demo_root, catalog_out=tmp_path / "cat")
        assert res.error is None, res.error
        found.update({(spec.name, k): v for k, v in res.by_reason.items()})
    assert found == {
        ("coyo-10m", "missing_image"): 3,
        ("coyo-10m", "empty_caption"): 1,
        ("llava-pretrain-558k", "missing_image"): 1,
        ("llava-pretrain-558k", "truncated_image"): 1,
        ("sharegpt4v-pretrain-82k", "not_an_image"): 1,
        ("sharegpt4v-pretrain-82k", "empty_file"): 1,
        ("laion-description-11k", "unknown_role"): 1,
        ("textvqa-train-35k", "image_marker_mismatch"): 1,
        ("geo-177k", "unsafe_path"): 1,
        ("q-instruct-198k", "duplicate_id"): 1,
        ("synthdog-en-ocr-200k", "decompression_bomb"): 1,
        ("allava-evol-instruct-143k", "empty_conversation"): 1,
    }
    multi = [
        r
        for name in reg
        for r in read_catalog(demo_root, name, tmp_path / "cat").to_pylist()
        if len(r["images"]) > 1
    ]
    assert multi and all(len(r["widths"]) == len(r["images"]) for r in multi)


def test_typed_fast_path_gives_the_same_reasons(root_info):
    """Without a row that breaks the typed read, the fast path must find exactly the same faults."""
    root, reg = root_info
    rows = [(s, r) for s, r in CONV_ROWS if s["id"] not in ("strconv", "turnnum", "turnstr", "convobj")]
    (root / "meta_files" / "conv.json").write_text(json.dumps([s for s, _ in rows]))
    validate_dataset(reg["conv"], root, processes=1)
    assert rejected(root, "conv") == {str(s["id"]): r for s, r in rows if r}


# -- property: whatever the samples, validate names every bad one and never fails the file ---------------
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["<image>", "<image>\nWhat?", " \t\n", "", "a.jpg", "42"]
)
_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _TEXT
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_IMAGE = st.sampled_from(["a.jpg", "sub/b.png", "nope.jpg", "../x.jpg", "/etc/passwd", ""]) | _JSON
_TURN = st.fixed_dictionaries(
    {},
    optional={
        "from": st.sampled_from(["human", "gpt", "system", "assistant"]) | _JSON,
        "value": _TEXT | _JSON,
    },
)
_CONVERSATION = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["x", "y"]) | _JSON,
        "image": _IMAGE | st.lists(_IMAGE, max_size=3),
        "conversations": st.lists(_TURN | _JSON, max_size=4) | _JSON,
        "other": _JSON,
    },
)
_CAPTION = st.fixed_dictionaries(
    {}, optional={"id": _JSON, "image_path": _IMAGE, "caption": _TEXT | _JSON, "other": _JSON}
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    form=st.sampled_from(["json", "jsonl"]),
    kind=st.sampled_from(["conversation", "caption"]),
    data=st.data(),
)
def test_validate_accounts_for_every_random_sample(tmp_path: Path, capsys, form, kind, data):
    samples = data.draw(st.lists((_CONVERSATION if kind == "conversation" else _CAPTION) | _JSON, max_size=8))
    root = tmp_path / "root"
    if not root.exists():
        make_root(tmp_path)
    meta = root / "meta_files" / f"p.{form}"
    if form == "json":
        meta.write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
    else:
        meta.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    info = tmp_path / "p.json"
    info.write_text(
        json.dumps({"p": {"meta_file": meta.name, "image_dir": "set", "data_format": kind, "stage": 3}})
    )
    res = validate_dataset(load_registry(info)["p"], root, mode="meta")
    assert capsys.readouterr().err == ""
    if res.error is not None:  # no sample at all, or none that is an object with an expected field
        assert (
            res.error.startswith(("meta_file_empty: ", "meta_file_malformed: ")) and not res.catalog_written
        )
        fields = (
            ("id", "image", "conversations") if kind == "conversation" else ("id", "image_path", "caption")
        )
        assert not any(isinstance(s, dict) and any(s.get(f) is not None for f in fields) for s in samples)
        return
    assert res.total == len(samples) and res.good + res.bad == res.total
    rej = pq.read_table(rejected_path(root, "p")).to_pylist()
    assert len(rej) == res.bad and sum(res.by_reason.values()) == res.bad
    assert all(r["reason"] and r["detail"] for r in rej)
    cat = read_catalog(root, "p").to_pylist()
    assert len(cat) == res.good
    assert sorted(r["row"] for r in rej + cat) == list(range(len(samples)))
    for r in cat:  # what pack reads is text of the right shape
        sample = samples[r["row"]]
        assert isinstance(sample, dict)
        if kind == "conversation":
            assert set(r["roles"]) <= {"system", "human", "gpt"} and len(r["roles"]) == len(r["texts"])
            values = [t["value"] for t in sample["conversations"]]
            assert all(isinstance(v, str) or type(v) in (int, float) for v in values)
            assert r["texts"] == [v if isinstance(v, str) else r["texts"][i] for i, v in enumerate(values)]
        else:
            assert isinstance(sample["caption"], str) and clean_caption(r["caption"]) != ""


def test_every_row_bad_validates_under_a_small_duckdb_memory_limit(tmp_path: Path, monkeypatch):
    """Bounded memory at any size: DuckDB's tables, joins and sorts spill to disk past
    OVIS_DUCKDB_MEMORY_LIMIT (no UPDATE of every row, which DuckDB would hold in memory), and the report
    is streamed. 300k caption rows whose images are all absent (every row bad, each in the report) pass
    through a 64 MB limit, under what their meta table alone takes (about 100 MB)."""
    n = 300_000
    root = tmp_path / "root"
    (root / "meta_files").mkdir(parents=True)
    (root / "images" / "absent").mkdir(parents=True)
    ids = pa.array([f"s{i}" for i in range(n)])
    pq.write_table(
        pa.table({"id": ids, "image_path": ids, "caption": pa.array(["a caption of a picture"] * n)}),
        root / "meta_files" / "big.parquet",
    )
    info = {"big": {"meta_file": "big.parquet", "image_dir": "absent", "data_format": "caption", "stage": 1}}
    (root / "info.json").write_text(json.dumps(info))
    monkeypatch.setenv("OVIS_DUCKDB_MEMORY_LIMIT", "64MB")
    result = validate_dataset(load_registry(root / "info.json")["big"], root, mode="meta")
    assert result.by_reason == {"missing_image": n} and result.catalog_written
    report = root / "report.json"
    write_report(report, [result], root, None)
    bad = json.loads(report.read_text())["bad_samples"]
    assert len(bad) == n and bad[-1] == {
        "dataset": "big", "row": n - 1, "id": f"s{n - 1}", "reason": "missing_image",
        "detail": f"s{n - 1}: no such file",
    }  # fmt: skip
    monkeypatch.setenv("OVIS_DUCKDB_MEMORY_LIMIT", "lots")
    with pytest.raises(OvisDataError, match="OVIS_DUCKDB_MEMORY_LIMIT='lots'"):
        validate_dataset(load_registry(root / "info.json")["big"], root, mode="meta")
