"""A small built-in corpus of all 19 datasets in their real formats, with deliberately broken samples.

Tests and `ovis-data demo` use it so that every part of the pipeline meets realistic data offline:
varied image sizes, modes and formats, multi-turn and multi-image conversations, a text-only dataset,
and a few samples broken in each way validate must catch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from .constants import IMAGE_MARK
from .registry import DatasetSpec, load_registry

OBJECTS = [
    "cat",
    "dog",
    "bicycle",
    "red car",
    "lighthouse",
    "bowl of ramen",
    "mountain lake",
    "robot",
    "chart",
    "street market",
    "sailboat",
    "old library",
    "tram",
    "sunflower field",
    "chess board",
]
PLACES = [
    "on a wooden table",
    "near the window",
    "under a cloudy sky",
    "in a busy street",
    "at sunset",
    "in the snow",
    "beside a river",
    "in a small kitchen",
    "on a mountain trail",
    "in a museum",
]
ADJ = ["bright", "quiet", "colourful", "blurry", "detailed", "dim", "vivid", "minimal", "crowded"]
QUESTIONS = [
    "What is shown in this picture?",
    "Describe the image in detail.",
    "What colour dominates?",
    "How many objects can you count?",
    "What is the weather like?",
    "Where might this be?",
    "Is there any text in the image?",
    "What is the main subject doing?",
]
UNICODE = ["Café ☕ au coin de la rue", "東京の夜景 🌃", "Müller's Straße", "Ελληνικά γράμματα", "🙂👍"]

# (dataset, rows): small but enough for packing several sequences per stage.
SIZES = {"coyo-10m": 160, "allava-evol-instruct-143k": 20}
DEFAULT_ROWS = 14


def random_sentence(rng: random.Random) -> str:
    obj, place, adj = rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(ADJ)
    return f"A {adj} photo of a {obj} {place}."


def _answer(rng: random.Random, long: bool = False) -> str:
    n = rng.randint(8, 16) if long else rng.randint(1, 4)
    parts = [random_sentence(rng) for _ in range(n)]
    if rng.random() < 0.15:
        parts.append(rng.choice(UNICODE))
    return " ".join(parts)


def random_image(rng: random.Random, width: int, height: int) -> Image.Image:
    """Gradients, shapes and noise: compresses like a photo, not like a flat colour."""
    nrng = np.random.default_rng(rng.randrange(2**32))
    # a column and a row broadcast, not two full grids: the same values (the same operations in the same
    # order per pixel), 1.5 s less a corpus build (10.6 -> 9.1 s; the tests build it several times)
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)[:, None]
    c = nrng.uniform(0, 255, size=(3, 3))
    base = np.empty((height, width, 3))
    for i in range(3):
        base[..., i] = c[i, 0] + (c[i, 1] - c[i, 0]) * x / width + (c[i, 2] - c[i, 0]) * y / height / 2
    base += nrng.normal(0, 12, size=base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 9)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(10, max(11, width // 2)), y0 + rng.randint(10, max(11, height // 2))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return img


def _save_image(img: Image.Image, path: Path, variant: int) -> None:
    """Rotate through the modes and formats real datasets contain."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = variant % 6
    if path.suffix == ".png":
        if kind == 1:
            img.convert("RGBA").save(path)
        elif kind == 2:
            img.convert("P", palette=Image.Palette.ADAPTIVE).save(path)
        else:
            img.save(path)
    elif kind == 3:
        img.convert("L").save(path, quality=90)
    elif kind == 4:
        img.convert("CMYK").save(path, quality=90)
    else:
        img.save(path, quality=90)


def _image_name(rng: random.Random, prefix: str, i: int) -> str:
    ext = ".png" if i % 5 == 2 else ".jpg"
    sub = f"part{i % 3}/" if prefix in ("llava_finetune", "allava_laion") else ""
    return f"{sub}{prefix}_{i:05d}{ext}"


def random_conversation(
    rng: random.Random, n_images: int, turns: int, system: bool, long: bool
) -> list[dict]:
    conv = []
    if system:
        conv.append({"from": "system", "value": "You are a careful visual assistant."})
    for t in range(turns):
        q = rng.choice(QUESTIONS)
        if t == 0 and n_images:
            where = rng.choice(["start", "end", "middle"])
            marks = "\n".join([IMAGE_MARK] * n_images)
            q = {"start": f"{marks}\n{q}", "end": f"{q}\n{marks}", "middle": f"Look: {marks} {q}"}[where]
        conv.append({"from": "human", "value": q})
        conv.append({"from": "gpt", "value": _answer(rng, long and t == turns - 1)})
    return conv


class _Writer:
    def __init__(self, root: Path, rng: random.Random, url_root: Path | None):
        self.root, self.rng, self.url_root = root, rng, url_root
        self.written: set[Path] = set()
        self.variant = 0

    def image(self, spec: DatasetSpec, name: str) -> None:
        base = self.url_root if (spec.url_source and self.url_root) else self.root / "images"
        path = base / spec.image_dir / name
        if path in self.written:
            return
        self.written.add(path)
        w = self.rng.choice([160, 240, 320, 480, 640, 800])
        h = max(48, int(w * self.rng.choice([0.5, 0.75, 1.0, 1.33, 0.6])))
        _save_image(random_image(self.rng, w, h), path, self.variant)
        self.variant += 1


def _conversation_rows(spec: DatasetSpec, rng: random.Random, writer: _Writer, n: int) -> list[dict]:
    rows = []
    prefix = spec.image_dir or "text"
    instruct = spec.stage == 3
    for i in range(n):
        sample: dict = {"id": f"{spec.name.split('-')[0]}-{i:06d}"}
        if spec.image_dir is None:
            sample["conversations"] = random_conversation(rng, 0, rng.randint(1, 3), i % 4 == 0, i % 5 == 0)
        else:
            n_images = 2 if (instruct and i % 7 == 3) else 1
            names = [_image_name(rng, prefix, (i * 3 + k) % 40) for k in range(n_images)]
            for name in names:
                writer.image(spec, name)
            sample["image"] = names if (n_images > 1 or i % 2) else names[0]
            turns = rng.randint(1, 4) if instruct else 1
            sample["conversations"] = random_conversation(
                rng, n_images, turns, instruct and i % 6 == 0, i % 5 == 0
            )
        rows.append(sample)
    return rows


def _break(spec: DatasetSpec, rows: list[dict], root: Path) -> None:
    """The deliberately broken samples, one or two kinds per dataset."""
    img_dir = root / "images" / (spec.image_dir or "")
    name = spec.name
    if name == "llava-pretrain-558k":
        rows[1]["image"] = "missing_00001.jpg"
        rows[2]["image"] = "truncated_00002.jpg"
        data = (img_dir / rows[0]["image"] if isinstance(rows[0]["image"], str) else img_dir).read_bytes()
        (img_dir / "truncated_00002.jpg").write_bytes(data[: len(data) // 2])
    elif name == "sharegpt4v-pretrain-82k":
        rows[1]["image"] = "not_an_image.jpg"
        (img_dir / "not_an_image.jpg").write_text("<!doctype html><html><body>404 Not Found</body></html>")
        rows[2]["image"] = "empty.jpg"
        (img_dir / "empty.jpg").write_bytes(b"")
    elif name == "laion-description-11k":
        rows[1]["conversations"][-1]["from"] = "assistant"
    elif name == "textvqa-train-35k":
        rows[1]["conversations"][0]["value"] = rows[1]["conversations"][0]["value"].replace(IMAGE_MARK, "")
    elif name == "geo-177k":
        rows[1]["image"] = "../llava_finetune/part0/llava_finetune_00000.jpg"
    elif name == "q-instruct-198k":
        rows[2]["id"] = rows[1]["id"]
    elif name == "synthdog-en-ocr-200k":
        rows[1]["image"] = "bomb.png"
        Image.new("1", (12000, 8000)).save(img_dir / "bomb.png")
    elif name == "allava-evol-instruct-143k":
        rows[1]["conversations"] = []


def build_demo_corpus(
    root: Path,
    seed: int = 0,
    url_root: Path | None = None,
    base_url: str = "http://images.invalid",
    stages: tuple[int, ...] = (1, 2, 3),
) -> Path:
    """Write the corpus under root (meta_files/, images/). With url_root, the images of URL datasets go
    there instead (to be served and fetched), and their URL lists point at base_url. `stages`: only the
    datasets of these (a smaller corpus for tests that need one stage)."""
    root = Path(root)
    (root / "meta_files").mkdir(parents=True, exist_ok=True)
    registry = {n: s for n, s in load_registry().items() if s.stage in stages}
    rng = random.Random(seed)
    writer = _Writer(root, rng, url_root)
    for spec in registry.values():
        n = SIZES.get(spec.name, DEFAULT_ROWS)
        meta = spec.meta_path(root)
        if spec.data_format == "caption":
            names = [_image_name(rng, spec.image_dir, i) for i in range(n)]
            for nm in names[:-3]:
                writer.image(spec, nm)  # the last three are never online: fetch and validate count them
            captions = [
                random_sentence(rng) + ("" if i % 9 else f" {IMAGE_MARK} watermark") for i in range(n)
            ]
            captions[4] = "   "
            pq.write_table(
                pa.table(
                    {
                        "id": pa.array(range(n), pa.int64()),
                        "image_url": [f"{base_url}/{spec.image_dir}/{nm}" for nm in names],
                        "image_path": names,
                        "caption": captions,
                    }
                ),
                meta,
            )
            continue
        rows = _conversation_rows(spec, rng, writer, n)
        _break(spec, rows, root)
        meta.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        if spec.url_source and spec.url_source.url_list != spec.meta_file:
            _append_url_list(spec, root, rows, base_url)
    return root


def _append_url_list(spec: DatasetSpec, root: Path, rows: list[dict], base_url: str) -> None:
    """cc12m's datasets share one URL list: merge this dataset's images into it."""
    path = spec.url_list_path(root)
    names = sorted(
        {n for r in rows for n in ([r["image"]] if isinstance(r.get("image"), str) else r.get("image", []))}
    )
    if path.exists():
        names = sorted(set(names) | set(pq.read_table(path).column("image_path").to_pylist()))
    pq.write_table(
        pa.table(
            {
                "url": [f"{base_url}/{spec.image_dir}/{n}" for n in names],
                "image_path": names,
            }
        ),
        path,
    )
