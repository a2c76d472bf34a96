"""Benchmark files in VLMEvalKit's TSV format, read row by row (a file of base64 images can be hundreds of
MB: only the images other rows refer to are kept in memory).

Columns (VLMEvalKit's; vlmeval/dataset/image_base.py reads them): `index` (an integer), `question`,
`answer`, the image as `image` (base64, or a list of them written as a Python list, or, when 64 characters
or fewer, the `index` of the row whose image it shares) or `image_path` (a path, relative ones to the
file's folder); optional `hint`, `category`, `l2-category`, `split`. Multiple choice files have option
columns `A`, `B`, ... (empty where a question has fewer options), the answer a letter; a file without
`A` and `B` is yes/no (MME, HallusionBench), the answer Yes or No.

A file that cannot be used (unreadable, not a TSV, a required column missing) raises BenchError; a row
that cannot be (no image, an image that does not decode, no answer, an answer that is not an option) is
yielded as a `BadRow` naming why, and skipped by the scorer.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

CIRCULAR_BASE = 1_000_000  # VLMEvalKit: a circular copy of question i has index i + k * 1e6
MCQ, YORN = "mcq", "yorn"


class BenchError(ValueError):
    """A benchmark file that cannot be used at all: one line naming the file and why."""


@dataclass
class Question:
    row: int  # data row number in the file (1 = the first row after the header)
    index: int | str
    kind: str  # MCQ or YORN
    question: str
    answer: str  # a letter, or Yes / No
    images: list[Image.Image]
    options: dict[str, str] = field(default_factory=dict)
    hint: str | None = None
    category: str = ""
    l2_category: str = ""

    @property
    def group(self) -> int | str:
        """The circular group: VLMEvalKit's `g_index = index % 1e6`."""
        return self.index % CIRCULAR_BASE if isinstance(self.index, int) else self.index


@dataclass
class BadRow:
    row: int
    index: str
    reason: str


@dataclass
class Bench:
    path: Path
    name: str
    kind: str
    columns: list[str]
    rows: int
    has_rotations: bool  # the file holds circular copies (an index >= 1e6)
    shared_images: dict[str, str]  # index -> image field, for rows other rows refer to


def _reader(path: Path) -> Iterator[list[str]]:
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            yield from csv.reader(f, delimiter="\t")
    except FileNotFoundError:
        raise BenchError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BenchError(f"{path}: a folder, not a TSV file") from None
    except UnicodeDecodeError as e:
        raise BenchError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise BenchError(f"{path}: not a readable TSV ({e})") from None


def _missing(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() == "nan"  # pandas' NaN, written


def open_bench(path: str | Path) -> Bench:
    """The file's columns and kind, checked, and the images rows share (one pass over the file)."""
    path = Path(path)
    rows = _reader(path)
    header = next(rows, None)
    if not header or len(header) < 2:
        raise BenchError(
            f"{path}: not a TSV file with a header row (VLMEvalKit's format: index, question, ...)"
        )
    need = ["index", "question", "answer"]
    missing = [c for c in need if c not in header]
    if "image" not in header and "image_path" not in header:
        missing.append("image or image_path")
    if missing:
        raise BenchError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(header[:12])})")
    kind = MCQ if "A" in header and "B" in header else YORN
    col = {c: i for i, c in enumerate(header)}
    refs: set[str] = set()
    n, rotated = 0, False
    for values in rows:
        if not values:
            continue
        n += 1
        index = values[col["index"]] if len(values) > col["index"] else ""
        rotated = rotated or (index.strip().isdigit() and int(index) >= CIRCULAR_BASE)
        image = values[col["image"]] if "image" in col and len(values) > col["image"] else ""
        if 0 < len(image.strip()) <= 64:
            refs.add(image.strip())
    shared: dict[str, str] = {}
    if refs:  # a second pass: the referred rows may come after the rows referring to them
        for values in _reader(path):
            if len(values) > col["image"] and values[col["index"]].strip() in refs:
                shared[values[col["index"]].strip()] = values[col["image"]]
    return Bench(path, path.stem, kind, header, n, rotated, shared)


def _decode_images(field_value: str, bench: Bench) -> list[Image.Image]:
    """Images of a row's `image` field (see the module doc); ValueError naming what is wrong."""
    value = field_value.strip()
    if len(value) <= 64:
        if value not in bench.shared_images or len(bench.shared_images[value].strip()) <= 64:
            raise ValueError(f"image refers to index {value!r}, which holds no image")
        value = bench.shared_images[value].strip()
    items = ast.literal_eval(value) if value.startswith("[") else [value]
    images = []
    for k, item in enumerate(items):
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"image {k}: broken base64 ({e})") from None
        images.append(_open(io.BytesIO(data), f"image {k}"))
    return images


def _open(source: io.BytesIO | Path, what: str) -> Image.Image:
    try:
        image = Image.open(source)
        image.load()
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{what}: not a readable image ({e})") from None
    return image.convert("RGB")


def _images_of(get: dict[str, str], bench: Bench) -> list[Image.Image]:
    if not _missing(get.get("image")):
        return _decode_images(get["image"], bench)
    if not _missing(get.get("image_path")):
        raw = get["image_path"].strip()
        paths = ast.literal_eval(raw) if raw.startswith("[") else [raw]
        return [
            _open(p if Path(p).is_absolute() else bench.path.parent / p, str(p)) for p in map(Path, paths)
        ]
    raise ValueError("no image (image and image_path are empty)")


def read_questions(bench: Bench) -> Iterator[Question | BadRow]:
    """Every data row as a Question, or a BadRow saying why it cannot be scored."""
    rows = _reader(bench.path)
    next(rows)
    n = 0
    for values in rows:
        if not values:
            continue
        n += 1
        get = dict(zip(bench.columns, values, strict=False))
        index = get.get("index", "").strip()
        try:
            yield _question(n, index, get, bench)
        except ValueError as e:
            yield BadRow(n, index, str(e))


def _question(n: int, index: str, get: dict[str, str], bench: Bench) -> Question:
    if _missing(get.get("question")):
        raise ValueError("no question")
    if _missing(get.get("answer")):
        raise ValueError("no answer")
    answer = get["answer"].strip()
    options = {}
    if bench.kind == MCQ:
        options = {c: get[c].strip() for c in string.ascii_uppercase if not _missing(get.get(c))}
        if len(options) < 2:
            raise ValueError(f"{len(options)} option(s): a multiple-choice question needs at least 2")
        if answer not in options:
            raise ValueError(f"answer {answer!r} is not one of the options {', '.join(options)}")
    else:
        if answer.lower() not in ("yes", "no"):
            raise ValueError(f"answer {answer!r} is not Yes or No")
        answer = answer.capitalize()
    images = _images_of(get, bench)
    return Question(
        row=n,
        index=int(index) if index.lstrip("-").isdigit() else index,
        kind=bench.kind,
        question=get["question"].strip(),
        answer=answer,
        images=images,
        options=options,
        hint=None if _missing(get.get("hint")) else get["hint"].strip(),
        category="" if _missing(get.get("category")) else get["category"].strip(),
        l2_category="" if _missing(get.get("l2-category")) else get["l2-category"].strip(),
    )


def rotations(q: Question) -> list[Question]:
    """MMBench's circular copies of a question: the options shifted by k = 0 .. n-1 places (copy k has
    index + k * 1e6 and its answer's letter moved with its text), as VLMEvalKit's circular files hold them."""
    letters = list(q.options)
    texts = list(q.options.values())
    n = len(letters)
    right = letters.index(q.answer)
    out = []
    for k in range(n):
        options = {letters[i]: texts[(i + k) % n] for i in range(n)}
        out.append(
            replace(q, index=q.index + k * CIRCULAR_BASE, options=options, answer=letters[(right - k) % n])
        )
    return out
