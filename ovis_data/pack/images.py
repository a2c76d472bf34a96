"""A packed image: the JPEG bytes pack stores for the model's ViT (resized as the image processor would)."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from ..constants import vit_resized_size

try:  # reads a JPEG's size and colour space without PIL's per-file parsing (a tenth of the time)
    import simplejpeg
except ImportError:  # a platform without its wheel: PIL reads the header
    simplejpeg = None

JPEG_QUALITY = 95


def resize_for_vit(data: bytes, size: int) -> tuple[bytes, int, int]:
    """RGB JPEG whose longer side is `size`, aspect kept (short side int(short/long*size), as v1 did);
    the model pads it to a square. A JPEG already so is passed through byte for byte."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # PIL decides, and raises what a damaged file deserves
            pass
        else:  # the 3-component colour spaces PIL opens as mode "RGB"
            if colorspace in ("YCbCr", "RGB") and (w, h) == vit_resized_size(w, h, size):
                return data, w, h
    # Over Pillow's pixel limit (validate's default --max-pixels too): what validation calls a
    # decompression bomb is an error here, not a warning printed by each worker; pack drops the sample and
    # counts it under that reason (a catalog validated with --meta-only never had its pixels checked).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    with img:
        w, h = img.size
        nw, nh = vit_resized_size(w, h, size)
        if img.format == "JPEG" and img.mode == "RGB" and (w, h) == (nw, nh):
            return data, w, h
        if img.format == "JPEG" and min(w / nw, h / nh) >= 2:
            img.draft("RGB", (nw, nh))  # decode at a DCT scale still >= the target: much less work
        rgb = img.convert("RGB") if img.mode != "RGB" else img
        rgb.load()
        out = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), nw, nh
