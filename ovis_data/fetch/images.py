"""Decode, resize and re-encode one downloaded image (runs in a worker process: pure function of bytes)."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image

from . import classes as C

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb threshold (about 0.25 GB of RGB)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_T = Image.Transpose
_TRANSPOSE = {
    2: _T.FLIP_LEFT_RIGHT,
    3: _T.ROTATE_180,
    4: _T.FLIP_TOP_BOTTOM,
    5: _T.TRANSPOSE,
    6: _T.ROTATE_270,
    7: _T.TRANSVERSE,
    8: _T.ROTATE_90,
}


@dataclass(frozen=True)
class ImageParams:
    max_side: int = 512  # 0: keep the original bytes (when they decode)
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class Processed:
    """The outcome for one image: encoded bytes and their record, or a failure class and detail."""

    status: str
    detail: str = ""
    data: bytes | None = None
    ext: str = "jpg"
    sha256: str = ""
    original_sha256: str = ""
    width: int = 0
    height: int = 0
    original_width: int = 0
    original_height: int = 0
    original_size: int = 0
    original_format: str = ""


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Keep the aspect ratio, cap the longer side at max_side, never upscale, never reach zero."""
    longer = max(width, height)
    if max_side <= 0 or longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        # Transparent pixels keep arbitrary colour data; composite on white as a browser shows them.
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im if im.mode == "RGB" else im.convert("RGB")


def _looks_like_markup(data: bytes) -> bool:
    head = data[:256].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"{", b"<"))


def process_image(data: bytes, params: ImageParams, expected_sha256: str | None = None) -> Processed:
    """Decode `data`, check it, and return a JPEG capped at params.max_side (or the original bytes)."""
    original_sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 and original_sha != expected_sha256.lower():
        return Processed(C.HASH_MISMATCH, f"sha256 {original_sha[:12]} != {expected_sha256[:12]}")
    Image.MAX_IMAGE_PIXELS = params.max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit; a bomb is a bomb either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _process(data, params, original_sha)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Processed(C.DECOMPRESSION_BOMB, str(e)[:200], original_size=len(data))
    except Image.UnidentifiedImageError:
        cls = C.NOT_IMAGE if _looks_like_markup(data) else C.DECODE_ERROR
        return Processed(cls, "not a recognised image format", original_size=len(data))
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        return Processed(C.DECODE_ERROR, f"{type(e).__name__}: {e}"[:200], original_size=len(data))


def _process(data: bytes, params: ImageParams, original_sha: str) -> Processed:
    im = Image.open(io.BytesIO(data))
    fmt = im.format or ""
    ow, oh = im.size
    result = Processed(
        C.SUCCESS,
        original_sha256=original_sha,
        original_width=ow,
        original_height=oh,
        original_size=len(data),
        original_format=fmt.lower(),
    )
    if params.max_side <= 0:
        im.load()  # keep the bytes only when they fully decode
        result.data = data
        result.ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}.get(
            fmt, fmt.lower() or "bin"
        )
        result.width, result.height = ow, oh
        result.sha256 = original_sha
        return result
    # EXIF orientation: cap the upright image, resize before turning it (less to turn).
    orientation = im.getexif().get(0x0112, 1) if fmt in ("JPEG", "WEBP", "TIFF", "PNG") else 1
    turn = _TRANSPOSE.get(orientation)
    swapped = orientation in (5, 6, 7, 8)
    tw, th = target_size(*((oh, ow) if swapped else (ow, oh)), params.max_side)
    want = (th, tw) if swapped else (tw, th)
    if fmt == "JPEG" and want != (ow, oh):
        # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 while staying at least the target size.
        im.draft("RGB", want)
    im = _to_rgb(im)
    if im.size != want:
        # Area averaging (BOX), as img2dataset's INTER_AREA: alias-free downscaling at the lowest cost.
        im = im.resize(want, Image.Resampling.BOX)
    if turn is not None:
        im = im.transpose(turn)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=params.quality)
    encoded = out.getvalue()
    result.data = encoded
    result.sha256 = hashlib.sha256(encoded).hexdigest()
    result.width, result.height = tw, th
    return result
