"""Image preprocessing as Ovis v1: aspect-kept resize of the longer side, CLIP normalization, centred pad."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ovis_model.preprocess import OvisImageProcessor, decode_rgb


def _original(image: Image.Image, side: int) -> torch.Tensor:
    """The v1 algorithm with transformers' own CLIP image processor (PIL backend): the reference."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(do_center_crop=False)
    w, h = image.size
    if w == h:
        new_w = new_h = side
    elif w > h:
        new_w, new_h = side, int(h / w * side)
    else:
        new_w, new_h = int(w / h * side), side
    values = torch.as_tensor(
        np.asarray(processor.preprocess(image, size={"height": new_h, "width": new_w})["pixel_values"][0])
    )
    square = torch.zeros(3, side, side)
    if new_h > new_w:
        start = (side - new_w) // 2
        square[:, :, start : start + new_w] = values
    else:
        start = (side - new_h) // 2
        square[:, start : start + new_h, :] = values
    return square


@pytest.mark.parametrize("size", [(500, 375), (240, 640), (333, 333), (1000, 7)])
def test_matches_the_original_clip_processor_and_pad(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = OvisImageProcessor(image_size=336).preprocess(image)
    assert ours.shape == (3, 336, 336)
    assert torch.allclose(ours, _original(image, 336), atol=1e-6)


def test_resize_rule_and_centred_zero_padding() -> None:
    processor = OvisImageProcessor(image_size=336)
    assert processor.resized_size(640, 480) == (336, 252)
    assert processor.resized_size(480, 640) == (252, 336)
    assert processor.resized_size(100, 99) == (336, int(99 / 100 * 336))
    values = processor.preprocess(Image.new("RGB", (640, 480), (255, 255, 255)))
    top = (336 - 252) // 2
    assert (values[:, :top] == 0).all() and (values[:, top + 252 :] == 0).all()
    assert (values[:, top : top + 252] > 1).all()  # white normalised is well above zero


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "L", "LA"])
def test_other_modes_become_rgb(mode: str) -> None:
    image = Image.new("RGB", (40, 30), (10, 200, 30)).convert(mode)
    processor = OvisImageProcessor(image_size=28)
    values = processor.preprocess(image)
    assert values.shape == (3, 28, 28)
    assert torch.allclose(values, processor.preprocess(image.convert("RGB")))


def test_save_load_round_trip_and_backbone_config(tmp_path) -> None:
    processor = OvisImageProcessor(image_size=56, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    processor.save_pretrained(tmp_path)
    loaded = OvisImageProcessor.from_pretrained(tmp_path)
    assert (loaded.image_size, loaded.image_mean, loaded.image_std) == (56, (0.5,) * 3, (0.5,) * 3)
    # transformers can read the file too (a CLIPImageProcessor config without centre crop)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    clip = CLIPImageProcessorPil.from_pretrained(tmp_path)
    assert clip.do_center_crop is False and list(clip.image_mean) == [0.5] * 3
    assert processor([]).shape == (0, 3, 56, 56)


def test_canvas_lookup_path_equals_the_float_path_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    processor = OvisImageProcessor(image_size=56)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(30, 80), (80, 30), (56, 56), (13, 100), (70, 69)]
    ]
    images.append(Image.fromarray(rng.integers(0, 256, (40, 20), dtype=np.uint8), mode="L"))
    canvas, sizes = processor.canvas(images)
    assert canvas.dtype == torch.uint8 and canvas.shape == (6, 56, 56, 3)  # channels last
    fast = processor.normalize_canvas(canvas, sizes)
    slow = torch.stack([processor.preprocess(im) for im in images])
    assert torch.equal(fast, slow)
    assert torch.equal(processor(images), slow)


def test_decode_rgb_gives_pils_pixels_and_refuses_damage() -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    encoded = {}
    for name, image, fmt in [
        ("rgb", Image.fromarray(pixels), "JPEG"),
        ("gray", Image.fromarray(pixels[:, :, 0]), "JPEG"),
        ("cmyk", Image.fromarray(pixels).convert("CMYK"), "JPEG"),
        ("png", Image.fromarray(pixels), "PNG"),
    ]:
        buf = io.BytesIO()
        image.save(buf, format=fmt, quality=95)
        encoded[name] = buf.getvalue()
    for name, data in encoded.items():
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        got = decode_rgb(data)
        assert got.dtype == np.uint8 and got.shape == (40, 56, 3), name
        assert np.array_equal(got, expected), name
    processor = OvisImageProcessor(image_size=56)
    from_arrays = processor.canvas([decode_rgb(d) for d in encoded.values()])
    from_pil = processor.canvas([Image.open(io.BytesIO(d)) for d in encoded.values()])
    assert all(torch.equal(a, b) for a, b in zip(from_arrays, from_pil, strict=True))
    for bad in (encoded["rgb"][: len(encoded["rgb"]) // 2], b"\xff\xd8" + bytes(300), b"not an image"):
        with pytest.raises((OSError, ValueError)):
            decode_rgb(bad)
