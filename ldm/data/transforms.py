"""Image loading and the image -> tensor transform shared by every dataset.

``load_rgb`` turns any file PIL can open into an 8-bit RGB image (EXIF orientation
applied, transparency composited over white, 16-bit and float images rescaled).
``ImageTransform`` resizes, crops, optionally flips and scales to [-1, 1].

Item keys: every map-style dataset of ``ldm.data`` takes ``dataset[i]`` or
``dataset[(i, aug_seed)]``; with a seed, random crop and flip draw from
``torch.Generator().manual_seed(aug_seed)`` so that an item's augmentation is a
function of its key alone (resumed runs are bit-exact). ``split_key`` parses keys.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps

CROPS = ("center", "random")
WHITE = (255, 255, 255)


def split_key(key: Any, length: int) -> tuple[int, torch.Generator | None]:
    """``i`` or ``(i, aug_seed)`` -> (index in ``[0, length)``, generator or None).

    Negative indices count from the end; out-of-range indices raise ``IndexError``.
    """
    if isinstance(key, tuple):
        if len(key) != 2:
            raise TypeError(f"item key must be an index or (index, aug_seed), got {key!r}")
        index, seed = operator.index(key[0]), operator.index(key[1])
        generator: torch.Generator | None = torch.Generator().manual_seed(seed)
    else:
        index, generator = operator.index(key), None
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {key!r} out of range for a dataset of {length} items")
    return index, generator


def _alpha_over_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_to_uint8(image: Image.Image) -> Image.Image:
    """A single-channel 16-bit, 32-bit integer or float image -> 8-bit RGB.

    ``I;16*`` spans 0..65535. ``I`` spans 0..255 if its values fit, else 0..65535
    (16-bit files that PIL widened to ``I``). ``F`` spans 0..1 if its values fit,
    else 0..255. Values outside the span are clipped.
    """
    values = np.asarray(image).astype(np.float64)  # (H, W)
    if image.mode.startswith("I;16"):
        peak = 65535.0
    elif image.mode == "I":
        peak = 255.0 if values.size == 0 or values.max() <= 255 else 65535.0
    else:  # "F"
        peak = 1.0 if values.size == 0 or values.max() <= 1.0 else 255.0
    gray = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, transparency composited over white.

    Does not apply EXIF orientation (``load_rgb`` does, since it has the file).
    """
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "LA", "La", "RGBA", "RGBa"):
        return _alpha_over_white(image)
    if mode.startswith("I") or mode == "F":
        return _scale_to_uint8(image)
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


MIN_IMAGE_SIDE = 8  # pixels: smaller files are icons or tracking pixels, not pictures to learn from


class ImageTooLargeError(OSError):
    """More pixels than ``PIL.Image.MAX_IMAGE_PIXELS``: refused as a possible decompression bomb."""


class ImageTooSmallError(OSError):
    """A side under ``MIN_IMAGE_SIDE`` pixels (e.g. a 1x1 tracking pixel): nothing to learn from."""


def check_pixels(width: int, height: int, min_side: int = 0) -> None:
    """Refuse images over PIL's pixel limit (PIL itself only warns up to twice the limit), and
    images with a side under ``min_side`` (training data passes ``MIN_IMAGE_SIDE``)."""
    if min(width, height) < min_side:
        raise ImageTooSmallError(
            f"{width}x{height} pixels is too small to train on (sides must be at least {min_side})"
        )
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageTooLargeError(
            f"{width}x{height} = {width * height} pixels is over the limit of {limit} "
            "(a possible decompression bomb; raise PIL.Image.MAX_IMAGE_PIXELS if the image is real)"
        )


def load_rgb(path_or_file: str | Path | IO[bytes], min_side: int = 0) -> Image.Image:
    """Open an image file, apply its EXIF orientation and return it as 8-bit RGB.

    Raises what PIL raises for unreadable files (``OSError`` and friends), and before decoding
    ``ImageTooLargeError`` for an image over ``PIL.Image.MAX_IMAGE_PIXELS`` or
    ``ImageTooSmallError`` for one with a side under ``min_side``.
    """
    with Image.open(path_or_file) as image:
        check_pixels(*image.size, min_side)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)  # a copy, detached from the file


class ImageTransform:
    """PIL image -> float32 tensor (3, R, R) in [-1, 1].

    Resize so that the shorter side is ``resolution`` (Lanczos when shrinking,
    bicubic when enlarging; PIL's filters are anti-aliased), crop a square
    (``center`` or ``random``), and with ``flip`` mirror horizontally with p = 0.5.
    Random crop and flip need a ``generator``; without one the crop is centered and
    nothing is flipped (deterministic, for validation).
    """

    def __init__(self, resolution: int, crop: str = "center", flip: bool = False) -> None:
        if crop not in CROPS:
            raise ValueError(f"crop is {crop!r}; allowed: {' | '.join(CROPS)}")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.crop = crop
        self.flip = flip

    def __repr__(self) -> str:
        return f"ImageTransform(resolution={self.resolution}, crop={self.crop!r}, flip={self.flip})"

    def __call__(
        self,
        image: Image.Image,
        generator: torch.Generator | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """-> (3, R, R), or (3, h, w) for ``size`` = (w, h) (an aspect-ratio bucket): resized to cover
        the target, then cropped to it."""
        return self.apply(image, generator, size)[0]

    def apply(
        self,
        image: Image.Image,
        generator: torch.Generator | None = None,
        size: tuple[int, int] | None = None,
        mask: Image.Image | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(pixels as ``__call__``, what was done to the image): ``{"original_size": (h, w) before
        resizing, "crop_top_left": (top, left) of the crop in the resized image}``, int64 (2,) each,
        SDXL's micro-conditioning; a flip mirrors the crop's left edge (left -> resized width - left - w).
        With ``mask`` (an ``L`` image of the image's size) also ``"mask"``: float32 (1, h, w) in [0, 1],
        resized (bilinear), cropped and flipped as the image."""
        image = to_rgb(image) if image.mode != "RGB" else image
        tw, th = size if size is not None else (self.resolution, self.resolution)
        w, h = image.size
        scale = max(tw / w, th / h)
        new_w, new_h = max(tw, round(w * scale)), max(th, round(h * scale))
        if (new_w, new_h) != (w, h):
            shrink = scale < 1
            resample = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
            image = image.resize((new_w, new_h), resample=resample)

        if self.crop == "random" and generator is not None:
            top = int(torch.randint(0, new_h - th + 1, (1,), generator=generator))
            left = int(torch.randint(0, new_w - tw + 1, (1,), generator=generator))
        else:
            top, left = (new_h - th) // 2, (new_w - tw) // 2
        image = image.crop((left, top, left + tw, top + th))
        weights = None
        if mask is not None:
            if mask.size != (w, h):
                raise ValueError(f"a {mask.size[0]}x{mask.size[1]} mask for a {w}x{h} image")
            if (new_w, new_h) != (w, h):
                mask = mask.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
            mask = mask.crop((left, top, left + tw, top + th))
            weights = torch.from_numpy(np.array(mask, dtype=np.uint8)).float().div_(255.0)[None]  # (1, h, w)

        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (h, w, 3)
        x = pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, h, w) in [-1, 1]
        if self.flip and generator is not None and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
            weights = weights.flip(-1) if weights is not None else None
            left = new_w - left - tw
        micro = micro_conditions((h, w), (top, left))
        if weights is not None:
            micro["mask"] = weights.contiguous()
        return x.contiguous(), micro


def micro_conditions(
    original_size: tuple[int, int], crop_top_left: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """An item's micro-conditioning keys: ``original_size`` (h, w) and ``crop_top_left`` (top, left)."""
    return {
        "original_size": torch.tensor(original_size, dtype=torch.long),
        "crop_top_left": torch.tensor(crop_top_left, dtype=torch.long),
    }
