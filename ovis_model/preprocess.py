"""Image preprocessing exactly as Ovis v1: keep the aspect, resize the longer side, normalize, pad centred.

The original called `CLIPImageProcessor.preprocess(img, size={"height": h, "width": w})` (PIL resize of the
uint8 image, rescale by 1/255, normalize) and pasted the result centred into a zero square; zero in
normalized space is the mean colour. This class reproduces that without torchvision and saves a
`preprocessor_config.json` that transformers' CLIP image processor can also read.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ovis_data.constants import vit_resized_size

try:  # libjpeg-turbo straight into numpy: twice as fast as PIL on the shards' 336 px JPEGs, same pixels
    import simplejpeg
except ImportError:  # a platform without its wheel: PIL decodes, the same pixels
    simplejpeg = None

CONFIG_NAME = "preprocessor_config.json"


def decode_rgb(data: bytes) -> np.ndarray:
    """`[h, w, 3]` uint8 RGB pixels of an encoded image. JPEGs go through simplejpeg (pixels identical to
    PIL's: both are libjpeg-turbo with its default, exact IDCT); anything it refuses goes to PIL, which
    raises the error a damaged file deserves."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            if simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray"):
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass
    img = Image.open(io.BytesIO(data))
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP's normalization


@dataclass
class OvisImageProcessor:
    image_size: int = 336
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    extra: dict = field(default_factory=dict, repr=False)  # other keys of a loaded config, kept on save

    # -- one image -----------------------------------------------------------------------------------------
    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) with the longer side = image_size, the shorter `int(short / long * side)`."""
        return vit_resized_size(width, height, self.image_size)

    def normalize(self, image: Image.Image) -> np.ndarray:
        """Resize (aspect kept) and normalize one image: float32 `[3, h, w]`."""
        if image.mode != "RGB":  # RGBA, palette, CMYK, grayscale
            image = image.convert("RGB")
        size = self.resized_size(*image.size)
        if image.size != size:
            image = image.resize(size, resample=self.resample, reducing_gap=None)
        # float64 rescale then float32, as transformers' `rescale` does, so values match it bit for bit
        array = (np.asarray(image, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return ((array - mean) / std).transpose(2, 0, 1)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """`[3, S, S]`: the normalized image centred in a square of zeros."""
        values = torch.from_numpy(np.ascontiguousarray(self.normalize(image)))
        side = self.image_size
        square = torch.zeros(3, side, side, dtype=values.dtype)
        _, h, w = values.shape
        top, left = (side - h) // 2, (side - w) // 2
        square[:, top : top + h, left : left + w] = values
        return square

    # -- many images: uint8 canvases, normalised by table lookup -------------------------------------------
    def lookup_table(self) -> np.ndarray:
        """`[3, 256]` float32: the normalised value of each uint8 level per channel, computed with exactly
        the operations of `normalize` (float64 rescale, float32 mean and std): a lookup is bit-identical."""
        levels = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return np.stack([(levels - mean[c]) / std[c] for c in range(3)]).astype(np.float32)

    def canvas(self, images: list[Image.Image | np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(`[n, S, S, 3]` uint8: each image resized and centred on a zero square, channels last so each
        row is one contiguous copy; `[n, 2]` int32: each image's (height, width)). A quarter of the float
        pixels' bytes: what loader workers hand over. Images are PIL images or `[h, w, 3]` uint8 RGB
        arrays (`decode_rgb`'s; resized through PIL only when not already at the model's size)."""
        side = self.image_size
        out = np.zeros((len(images), side, side, 3), dtype=np.uint8)
        sizes = np.zeros((len(images), 2), dtype=np.int32)
        for i, image in enumerate(images):
            if isinstance(image, np.ndarray):
                pixels = image
                size = self.resized_size(image.shape[1], image.shape[0])
                if (image.shape[1], image.shape[0]) != size:
                    pixels = np.asarray(
                        Image.fromarray(image).resize(size, resample=self.resample, reducing_gap=None)
                    )
            else:
                if image.mode != "RGB":  # RGBA, palette, CMYK, grayscale
                    image = image.convert("RGB")
                size = self.resized_size(*image.size)
                if image.size != size:
                    image = image.resize(size, resample=self.resample, reducing_gap=None)
                pixels = np.asarray(image)
            w, h = size
            top, left = (side - h) // 2, (side - w) // 2
            out[i, top : top + h, left : left + w] = pixels
            sizes[i] = (h, w)
        return torch.from_numpy(out), torch.from_numpy(sizes)

    def normalize_canvas(self, canvas: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """`[n, 3, S, S]` float32 from `canvas()`'s output, on its device (a GPU does it in microseconds):
        the lookup table per channel, zero outside each image. Equal bit for bit to `preprocess`."""
        table = torch.from_numpy(self.lookup_table()).to(canvas.device)
        n, side = canvas.shape[0], canvas.shape[1]
        values = torch.empty((n, 3, side, side), dtype=torch.float32, device=canvas.device)
        for c in range(3):  # one channel at a time: a plain lookup per plane, ~3x faster on a CPU
            values[:, c].copy_(table[c][canvas[..., c].long()])
        h, w = sizes[:, 0].to(canvas.device, torch.long), sizes[:, 1].to(canvas.device, torch.long)
        top, left = (side - h) // 2, (side - w) // 2
        pos = torch.arange(side, device=canvas.device)
        rows = (pos[None] >= top[:, None]) & (pos[None] < (top + h)[:, None])
        cols = (pos[None] >= left[:, None]) & (pos[None] < (left + w)[:, None])
        inside = rows[:, None, :, None] & cols[:, None, None, :]
        return values.masked_fill_(~inside, 0.0)

    def __call__(self, images: Image.Image | list[Image.Image]) -> torch.Tensor:
        """`[n, 3, S, S]` for a list of images (an empty list gives `[0, 3, S, S]`)."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return self.normalize_canvas(*self.canvas(images))

    # -- persistence ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A CLIPImageProcessor-compatible dict (no centre crop) plus our own fields."""
        side = self.image_size
        out = dict(self.extra)
        out.update(
            image_processor_type="CLIPImageProcessor",
            ovis_image_processor=True,
            do_resize=True,
            size={"height": side, "width": side},
            crop_size={"height": side, "width": side},
            do_center_crop=False,
            do_rescale=True,
            rescale_factor=self.rescale_factor,
            do_normalize=True,
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
            resample=self.resample,
            do_convert_rgb=True,
            image_size=side,
            pad_to_square=True,
        )
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, raw: dict, image_size: int | None = None) -> OvisImageProcessor:
        """From our own config or from a backbone's CLIP/SigLIP processor config."""
        side = image_size or raw.get("image_size")
        if side is None:  # a CLIP processor config: crop_size is the model's input side
            for key in ("crop_size", "size"):
                value = raw.get(key)
                if isinstance(value, dict):
                    side = value.get("height") or value.get("shortest_edge")
                elif isinstance(value, int):
                    side = value
                if side:
                    break
        known = {"image_mean", "image_std", "resample", "rescale_factor", "image_size"}
        return cls(
            image_size=int(side or 336),
            image_mean=tuple(raw.get("image_mean", CLIP_MEAN)),
            image_std=tuple(raw.get("image_std", CLIP_STD)),
            resample=int(raw.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            extra={k: v for k, v in raw.items() if k not in known and not k.startswith("_")},
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, image_size: int | None = None
    ) -> OvisImageProcessor:
        raw = json.loads((Path(directory) / CONFIG_NAME).read_text(encoding="utf-8"))
        return cls.from_dict(raw, image_size=image_size)

    @classmethod
    def for_backbone(cls, backbone_config, directory: str | os.PathLike | None = None) -> OvisImageProcessor:
        """The backbone's own processor settings where its directory has them, else its family's defaults."""
        side = int(backbone_config.image_size)
        if directory is not None and (Path(directory) / CONFIG_NAME).exists():
            return cls.from_pretrained(directory, image_size=side)
        if "siglip" in backbone_config.model_type:
            return cls(
                image_size=side, image_mean=HALF, image_std=HALF, resample=int(Image.Resampling.BICUBIC)
            )
        return cls(image_size=side)
