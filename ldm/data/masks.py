"""Masked loss: per-pixel loss weights for an image, from a mask file next to it or its alpha channel.

A mask file is ``<stem>-masklabel.png`` (any image extension) next to ``<stem>.<ext>``, OneTrainer's
naming: white trains, black is ignored, grey in between. Without one, an image with transparency uses
its alpha channel (opaque trains); without either, every pixel counts (all ones). Mask files are never
training images themselves. The mask follows the image's resize, crop and flip, and is averaged down
to the latents' size (``latent_mask``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ldm.core.errors import DataError
from ldm.data.transforms import to_rgb

MASK_SUFFIX = "-masklabel"


def is_mask_file(path: Path) -> bool:
    return path.stem.endswith(MASK_SUFFIX)


def mask_file(image: Path, extensions: Sequence[str]) -> Path | None:
    """The mask file next to ``image``, if there is one."""
    for ext in extensions:
        for candidate in (ext, ext.upper()):
            path = image.with_name(f"{image.stem}{MASK_SUFFIX}{candidate}")
            if path.is_file():
                return path
    return None


def load_mask(image: Path, extensions: Sequence[str]) -> Image.Image | None:
    """The mask of ``image`` as an 8-bit ``L`` image the size of the image (EXIF orientation applied
    to both), or None when it has neither a mask file nor transparency."""
    path = mask_file(image, extensions)
    if path is not None:
        with Image.open(path) as m:
            m.load()
            m = ImageOps.exif_transpose(m)
            wide = m.mode.startswith("I") or m.mode == "F"  # 16-bit, 32-bit: rescaled, not clipped
            return (to_rgb(m) if wide else m).convert("L")
    with Image.open(image) as im:
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
            im.load()
            return ImageOps.exif_transpose(im).convert("RGBA").getchannel("A")
    return None


def check_mask_sizes(
    images: Sequence[tuple[Path, tuple[int, int] | None]], extensions: Sequence[str]
) -> None:
    """A ``DataError`` naming the masks whose size is not their image's ((width, height) as displayed)."""
    wrong = []
    for path, size in images:
        mask = mask_file(path, extensions)
        if mask is None or size is None:
            continue
        with Image.open(mask) as m:
            w, h = m.size
            if m.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
        if (w, h) != tuple(size):
            wrong.append(f"{mask} is {w}x{h}, its image {size[0]}x{size[1]}")
    if wrong:
        raise DataError(
            f"{len(wrong)} mask file(s) differ in size from their image: {'; '.join(wrong[:5])}"
            f"{', ...' if len(wrong) > 5 else ''}. Save each mask at its image's size"
        )


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) pixel weights -> (B, 1, h, w): each latent pixel the mean of the pixels it covers."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask.float(), size=size, mode="area")
