"""Read a ``shapes`` image back into its caption, from pixels alone (no learned model).

``classify(image) -> (color, shape, background)`` measures what an image of the built-in
``shapes`` dataset (``ldm.data.shapes``) shows, so that generated samples can be scored
against the prompts that produced them (``caption_accuracy``). Generated images are noisy
approximations -- colors drift, edges blur, shapes come out slightly irregular -- so every
step uses robust statistics over many pixels rather than exact values:

1. background: the per-channel median of the border pixels (the shape is wholly inside the
   image, so it covers at most a small part of the border); its name is the nearest palette
   background.
2. foreground: pixels far (in RGB) from that background. The shape's color is the median of
   the most confidently foreground pixels, named by the nearest palette color.
3. coverage: each pixel's fraction of shape color, ``alpha``, from projecting its color onto
   the background -> shape color line (so anti-aliased or blurred edges count fractionally),
   kept within 2 pixels of the largest connected blob of ``alpha > 0.5``, so that specks
   elsewhere are ignored.
4. shape: template matching. For each of circle, square and upward equilateral triangle, draw
   (anti-aliased) the shape with the measured area and centroid -- both barely move under blur,
   noise or small distortions -- and compare it with ``alpha`` (L1 over the area, both maps
   lightly blurred, the template also at a few stronger blurs to match a blurry image). The
   best fit wins. The same is done for a few ``NEAR_MISSES``, shapes that are in no caption.

Every reading that is not one shape of a palette color on a palette background says "none"
where it fails, so that it never matches a caption:

- no (or too little) foreground: ``("none", "none", background)``;
- more than one shape -- a second sizeable blob (``MAX_SECOND_BLOB``) or foreground over 2 px
  away from the shape (``MAX_STRAY``), whatever its color: color and shape "none";
- a shape that fits no template (``MAX_TEMPLATE_ERROR``), fits a near miss (pentagon,
  hexagon, five-pointed star, rounded square) clearly better (``NEAR_MISS_RATIO``) or is
  elongated (``MAX_ANISOTROPY``; the three shapes have isotropic second moments): shape "none";
- a color / background far from every palette entry (``MAX_COLOR_DISTANCE``,
  ``MAX_BACKGROUND_DISTANCE``): color / background "none".

Each threshold lies between two measured distributions: the dataset's validation images (1000
at 32 and at 64 px), clean and degraded the ways generated samples are (blur, noise, JPEG q75
and q50, down- and up-scaling, +-7% scaling per axis, a 0.7 px warp with softening, noise and
color drift, a mix of these), and images that must read "none" (clean and blurred):

- ``MAX_TEMPLATE_ERROR`` 0.25: right fits reach 0.25 degraded (64 px: 0.15; clean: 0.02);
  crosses, downward triangles and rings fit nothing better than 0.30 (blurred, 32 px: 0.24).
- ``NEAR_MISS_RATIO`` 0.7: pentagons, hexagons, stars and rounded squares fit a circle or
  square to 0.04-0.25, like degraded true shapes, but their own template to at most 0.55x
  that (blurred, 32 px: 99.5% under 0.7x); a true shape's near misses: never under 0.80x.
- ``MAX_ANISOTROPY`` 1.9: at most 1.77 degraded; 3:2 ellipses at least 1.94.
- ``MAX_COLOR_DISTANCE``, ``MAX_BACKGROUND_DISTANCE`` 64: drift reaches 52 (a color-drift
  stress of sigma 20 per channel: 75); orange, brown (139, 69, 19), sienna: 80+ off the palette.
- ``MAX_STRAY`` 0.08: at most 0.05 degraded (a 2 x 2 speck: 0.04); a second shape of side 25%
  or more of the image: at least 0.13.

Read as a true shape (closer to one than a 0.7 px warp moves it): octagons, ellipses up to
about 4:3, squares with corner radius under 0.4 of the half side, fat crosses, rings with a
small hole.
Everything measured is available through ``read_batch``.

The palettes default to the dataset's (``COLORS``, ``BACKGROUNDS``) and can be extended, e.g.
``classify(image, colors={**COLORS, "orange": (240, 140, 30)})``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.shapes import BACKGROUNDS, COLORS, CROSS_ARM, NEW_SHAPES, SHAPES

NONE = "none"  # the color / shape of an image without a (recognisable) one; never in a caption

FOREGROUND_DISTANCE = 48.0  # RGB distance (0..255 units) from the background that counts as foreground
CORE_FRACTION = 0.8  # shape-color pixels: distance >= this x the 90th percentile over foreground pixels
MIN_SHAPE_FRACTION = 0.01  # a shape smaller than this fraction of the image reads as "none" (smallest: 0.053)
MIN_FOREGROUND_PIXELS = 4
MAX_COLOR_DISTANCE = 64.0  # RGB distance to the nearest palette color beyond which the color is "none"
MAX_BACKGROUND_DISTANCE = 64.0  # RGB distance to the nearest palette background beyond which it is "none"
MAX_STRAY = 0.08  # foreground pixels over 2 px away from the shape / its area: more is 2+ shapes
MAX_SECOND_BLOB = 0.25  # a second solid blob at least this fraction of the largest: not one shape, "none"
TEMPLATE_MARGIN = 3  # pixels around the shape's extent that the template comparison covers
TEMPLATE_BLURS = 3  # template blurred 1..3 extra times ([1, 2, 1] each); the best fit counts
MAX_TEMPLATE_ERROR = 0.25  # a best fit worse than this (L1 mismatch / area) reads as shape "none"
NEAR_MISSES = ("pentagon", "hexagon", "star", "rounded square")  # non-caption shapes close to a caption one
STAR_INNER = 0.45  # the star near miss (five points): inner / outer radius
ROUNDED_CORNER = 0.5  # the rounded-square near miss: corner radius / half side
NEAR_MISS_RATIO = 0.7  # a near miss fitting better than this x the best shape's error: shape "none"
MAX_ANISOTROPY = 1.9  # second-moment eigenvalue ratio beyond which the shape is "none" (3:2 ellipse: 2.25)

Palette = Mapping[str, Sequence[int] | Sequence[float]]


@dataclass(frozen=True)
class ShapeReading:
    """Everything ``classify`` measured on one image (for inspection and tuning)."""

    color: str
    shape: str
    background: str
    background_rgb: tuple[float, float, float]  # measured: median of the border, 0..255
    foreground_rgb: tuple[float, float, float] | None  # measured: median of the core pixels; None: none
    area: float  # shape area in pixels (sum of the coverage)
    errors: dict[str, float] = field(default_factory=dict)  # shape -> template mismatch (L1 / area)
    blobs: int = 1  # solid blobs at least MAX_SECOND_BLOB x the largest (more than 1: 2+ shapes)
    anisotropy: float = 1.0  # second-moment eigenvalue ratio: 1 for every true shape
    stray: float = 0.0  # foreground pixels away from the shape / its area (over MAX_STRAY: 2+ shapes)
    color_distance: float = math.nan  # RGB distance of foreground_rgb to the nearest palette color
    background_distance: float = 0.0  # RGB distance of background_rgb to the nearest palette background
    near_misses: dict[str, float] = field(default_factory=dict)  # NEAR_MISSES shape -> template mismatch

    @property
    def label(self) -> tuple[str, str, str]:
        return self.color, self.shape, self.background


# ---------------------------------------------------------------------------- inputs


def _hwc_or_chw(array: np.ndarray) -> np.ndarray:
    """One image array, (3, H, W) or (H, W, 3) -> (3, H, W)."""
    if array.ndim != 3:
        raise ValueError(f"an image must have 3 dimensions (3, H, W) or (H, W, 3), got shape {array.shape}")
    if array.shape[0] == 3:
        return array
    if array.shape[-1] == 3:
        return np.moveaxis(array, -1, 0)
    raise ValueError(f"an image must have 3 channels, got shape {array.shape}")


def _as_unit255(array: np.ndarray) -> np.ndarray:
    """uint8 -> float32 as is; floats are taken to be in [-1, 1] and mapped to [0, 255]."""
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return (np.clip(array.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return np.clip(array, 0, 255).astype(np.float32)
    raise TypeError(f"unsupported image dtype {array.dtype}")


def _to_numpy(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype in (torch.bfloat16, torch.float16):
            image = image.float()
        return image.numpy()
    if isinstance(image, np.ndarray):
        return image
    raise TypeError(f"expected a PIL image, a torch tensor or a numpy array, got {type(image).__name__}")


def _images(images: Any) -> list[np.ndarray]:
    """Any supported batch -> (3, H, W) arrays, still in their own dtype (see ``_as_unit255``)."""
    if isinstance(images, (list, tuple)):
        return [_single(image) for image in images]
    array = _to_numpy(images)
    if array.ndim == 4:
        if array.shape[1] != 3 and array.shape[-1] == 3:
            array = np.moveaxis(array, -1, 1)
        if array.shape[1] != 3:
            raise ValueError(f"a batch must be (B, 3, H, W) or (B, H, W, 3), got shape {array.shape}")
        return list(array)
    return [_hwc_or_chw(array)]


def _single(image: Any) -> np.ndarray:
    array = _to_numpy(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    return _hwc_or_chw(array)


def _palette(
    palette: Palette | None, default: Mapping[str, tuple[int, int, int]]
) -> tuple[list[str], np.ndarray]:
    palette = default if palette is None else palette
    if not palette:
        raise ValueError("a palette needs at least one entry")
    names = list(palette)
    values = np.asarray([palette[name] for name in names], dtype=np.float32).reshape(len(names), -1)
    if values.shape[1] != 3:
        raise ValueError("palette values must be (r, g, b) triples in 0..255")
    return names, values


def _nearest(rgb: np.ndarray, names: list[str], values: np.ndarray) -> tuple[str, float]:
    """The palette entry nearest to ``rgb`` and its RGB distance."""
    squared = ((values - rgb) ** 2).sum(axis=1)
    k = int(np.argmin(squared))
    return names[k], float(math.sqrt(squared[k]))


# ---------------------------------------------------------------------------- measurement


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3 x 3 binary dilation (8-connected)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    grown = out.copy()
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    return grown


def _blobs(mask: np.ndarray, min_fraction: float) -> list[np.ndarray]:
    """The 8-connected components of ``mask``, largest first, down to ``min_fraction`` of the
    largest (smaller ones are left out)."""
    remaining = mask.copy()
    blobs: list[np.ndarray] = []
    while remaining.any():
        largest = max((int(blob.sum()) for blob in blobs), default=0)
        if remaining.sum() < min_fraction * largest:
            break
        blob = np.zeros_like(mask)
        blob.flat[int(np.flatnonzero(remaining)[0])] = True
        size = 1
        while True:
            blob = _dilate(blob) & remaining
            new_size = int(blob.sum())
            if new_size == size:
                break
            size = new_size
        remaining &= ~blob
        blobs.append(blob)
    blobs.sort(key=lambda blob: -int(blob.sum()))
    return [blob for blob in blobs if blob.sum() >= min_fraction * blobs[0].sum()]


def _blur3(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur (variance 1/2 pixel^2 per axis) over the last two axes, edges replicated."""
    p = np.concatenate([a[..., :1, :], a, a[..., -1:, :]], axis=-2)
    a = 0.25 * (p[..., :-2, :] + p[..., 2:, :]) + 0.5 * p[..., 1:-1, :]
    p = np.concatenate([a[..., :1], a, a[..., -1:]], axis=-1)
    return 0.25 * (p[..., :-2] + p[..., 2:]) + 0.5 * p[..., 1:-1]


def _template_coverage(shape: str, area: float, y: np.ndarray, x: np.ndarray, angle: float) -> np.ndarray:
    """Coverage of the pixels at offsets ``y`` (column) x ``x`` (row) from the centroid by
    ``shape`` of ``area`` pixels, anti-aliased as ``clip(0.5 - signed distance, 0, 1)``.

    ``shape`` is one of ``SHAPES`` or of ``NEAR_MISSES``; ``angle`` (radians, x right, y down)
    is the direction of a vertex of the pentagon / hexagon / star."""
    if shape == "circle":
        distance = np.hypot(y, x) - math.sqrt(area / math.pi)
    elif shape == "square":
        distance = np.maximum(np.abs(y), np.abs(x)) - math.sqrt(area) / 2
    elif shape == "triangle":  # upward equilateral: base 1/3 of the height below the centroid
        inradius = math.sqrt(math.sqrt(3) * area) / 3  # area = height^2 / sqrt(3)
        distance = np.maximum(y, (math.sqrt(3) * np.abs(x) - y) / 2) - inradius
    elif shape == "cross":  # a plus sign, arms CROSS_ARM x its side thick (ldm.data.shapes.NEW_SHAPES)
        half = math.sqrt(area / (2 * CROSS_ARM - CROSS_ARM**2)) / 2  # area = side^2 (2k - k^2)
        arm = CROSS_ARM * half
        ay, ax = np.abs(y), np.abs(x)
        distance = np.minimum(np.maximum(ay - arm, ax - half), np.maximum(ay - half, ax - arm))
    elif shape in ("pentagon", "hexagon"):  # regular, a vertex towards ``angle``
        n = 5 if shape == "pentagon" else 6
        apothem = math.sqrt(area / (n * math.tan(math.pi / n)))  # area = n * apothem^2 * tan(pi / n)
        normals = (angle + (2 * np.arange(n) + 1) * math.pi / n)[:, None, None]
        distance = (np.cos(normals) * x + np.sin(normals) * y).max(axis=0) - apothem
    elif shape == "star":  # five points, inner radius STAR_INNER x the outer, a point towards ``angle``
        outer = math.sqrt(area / (5 * STAR_INNER * math.sin(math.pi / 5)))  # 10 x R * r * sin(36°) / 2
        sector = 2 * math.pi / 5
        phi = np.mod(np.arctan2(y, x) - angle, sector)
        phi = np.minimum(phi, sector - phi)  # mirrored into [0, 36°]: nearest is the edge point -> notch
        rho = np.hypot(y, x)
        ex = STAR_INNER * outer * math.cos(math.pi / 5) - outer
        ey = STAR_INNER * outer * math.sin(math.pi / 5)
        distance = ((rho * np.cos(phi) - outer) * ey - rho * np.sin(phi) * ex) / math.hypot(ex, ey)
    elif shape == "rounded square":  # axis-aligned, corner radius ROUNDED_CORNER x the half side
        half = math.sqrt(area / (4 - (4 - math.pi) * ROUNDED_CORNER**2))
        r = ROUNDED_CORNER * half
        qy, qx = np.abs(y) - (half - r), np.abs(x) - (half - r)
        distance = np.hypot(np.maximum(qy, 0), np.maximum(qx, 0)) + np.minimum(np.maximum(qy, qx), 0) - r
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - distance, 0.0, 1.0)


def _anisotropy(alpha: np.ndarray) -> float:
    """Larger over smaller eigenvalue of the coverage's second-moment matrix: 1 for the disc,
    the square and the equilateral triangle alike (4 for a 2:1 ellipse)."""
    area = float(alpha.sum())
    ys = np.arange(alpha.shape[0], dtype=np.float64)[:, None]
    xs = np.arange(alpha.shape[1], dtype=np.float64)[None, :]
    dy = ys - float((alpha * ys).sum()) / area
    dx = xs - float((alpha * xs).sum()) / area
    var_y, var_x = float((alpha * dy**2).sum()) / area, float((alpha * dx**2).sum()) / area
    cov = float((alpha * dx * dy).sum()) / area
    mean, half_gap = (var_x + var_y) / 2, math.hypot((var_x - var_y) / 2, cov)
    return (mean + half_gap) / max(mean - half_gap, 1e-12)


def _template_errors(
    alpha: np.ndarray, new_shapes: Sequence[str] = ()
) -> tuple[dict[str, float], dict[str, float]]:
    """Mismatch of the shape coverage ``alpha`` (zero away from the shape) with each shape (and each
    of ``new_shapes``), and with each near miss (``NEAR_MISSES``).

    Each template has the measured area and centroid (the pentagon, hexagon and star also the
    orientation of the coverage's 5- / 6-fold angular moment); the error is the L1 difference
    of the lightly blurred maps over the area (0: identical, 2: disjoint), the least over a few
    extra blurs of the template, so that blurred images match their blurred shape.
    """
    height, width = alpha.shape
    nonzero_rows = np.flatnonzero(alpha.any(axis=1))
    nonzero_cols = np.flatnonzero(alpha.any(axis=0))
    m = TEMPLATE_MARGIN
    rows = (max(int(nonzero_rows[0]) - m, 0), min(int(nonzero_rows[-1]) + m, height - 1))
    cols = (max(int(nonzero_cols[0]) - m, 0), min(int(nonzero_cols[-1]) + m, width - 1))
    target = alpha[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1].astype(np.float64)
    area = float(target.sum())
    ys, xs = np.arange(rows[0], rows[1] + 1), np.arange(cols[0], cols[1] + 1)
    cy = float(target.sum(axis=1) @ ys) / area
    cx = float(target.sum(axis=0) @ xs) / area
    y, x = ys[:, None] - cy, xs[None, :] - cx  # pixel offsets from the centroid
    z = x + 1j * y
    weight = target * np.abs(z) ** 2  # the rim decides the orientation
    target = _blur3(target)
    shapes = [*SHAPES, *new_shapes, *NEAR_MISSES]
    folds = {"pentagon": 5, "hexagon": 6, "star": 5}
    angles = [
        float(np.angle((weight * z ** folds[s]).sum())) / folds[s] if s in folds else 0.0 for s in shapes
    ]
    templates = _blur3(
        np.stack([_template_coverage(s, area, y, x, a) for s, a in zip(shapes, angles, strict=True)])
    )
    best = np.full(len(shapes), np.inf)
    for _ in range(TEMPLATE_BLURS):
        best = np.minimum(best, np.abs(templates - target).sum(axis=(1, 2)) / area)
        templates = _blur3(templates)
    errors = {s: float(e) for s, e in zip(shapes, best, strict=True)}
    return {s: errors[s] for s in [*SHAPES, *new_shapes]}, {s: errors[s] for s in NEAR_MISSES}


def _read(
    image: np.ndarray,
    color_palette: tuple[list[str], np.ndarray],
    bg_palette: tuple[list[str], np.ndarray],
    new_shapes: Sequence[str] = (),
) -> ShapeReading:
    """Measure one (3, H, W) image: uint8, or float in [-1, 1]; ``new_shapes`` compete with ``SHAPES``."""
    image = _as_unit255(image)
    _, height, width = image.shape
    if height < 3 or width < 3:
        raise ValueError(f"an image must be at least 3 x 3 pixels, got {height} x {width}")
    border = np.concatenate([image[:, 0], image[:, -1], image[:, 1:-1, 0], image[:, 1:-1, -1]], axis=1)
    bg = np.median(border, axis=1)
    background, bg_distance = _nearest(bg, *bg_palette)
    if bg_distance > MAX_BACKGROUND_DISTANCE:
        background = NONE  # not any palette background
    bg_rgb = (float(bg[0]), float(bg[1]), float(bg[2]))
    nothing = ShapeReading(NONE, NONE, background, bg_rgb, None, 0.0, blobs=0, anisotropy=0.0,
                           background_distance=bg_distance)  # fmt: skip

    diff = image - bg[:, None, None]  # (3, H, W)
    dist = np.sqrt((diff * diff).sum(axis=0))  # (H, W)
    candidate = dist > FOREGROUND_DISTANCE
    min_pixels = max(MIN_FOREGROUND_PIXELS, MIN_SHAPE_FRACTION * height * width)
    if int(candidate.sum()) < min_pixels:
        return nothing
    core = candidate & (dist >= CORE_FRACTION * np.percentile(dist[candidate], 90))
    fg = np.median(image[:, core], axis=1)
    color, color_distance = _nearest(fg, *color_palette)
    fg_rgb = (float(fg[0]), float(fg[1]), float(fg[2]))
    if color_distance > MAX_COLOR_DISTANCE:
        color = NONE  # not any palette color

    # coverage: each pixel's position on the background -> shape color line, kept near the
    # largest solid blob (anti-aliased edge included)
    axis = fg - bg
    alpha = np.clip(np.tensordot(axis, diff, axes=1) / float(axis @ axis), 0.0, 1.0)  # (H, W)
    blobs = _blobs(alpha > 0.5, MAX_SECOND_BLOB)
    if not blobs or blobs[0].sum() < min_pixels:
        return nothing
    region = _dilate(_dilate(blobs[0]))
    alpha = np.where(region, alpha, 0.0)
    area = float(alpha.sum())
    # foreground away from the shape (another shape, of its color or another one): far from
    # the background both as is and lightly blurred, so that neither noise nor specks count
    smooth = _blur3(diff)  # (3, H, W)
    far = candidate & ((smooth * smooth).sum(axis=0) > FOREGROUND_DISTANCE**2)
    stray = float((far & ~region).sum()) / area
    errors, near_misses = _template_errors(alpha, new_shapes)
    anisotropy = _anisotropy(alpha)
    shape = min(errors, key=errors.__getitem__)
    if (
        errors[shape] > MAX_TEMPLATE_ERROR
        or anisotropy > MAX_ANISOTROPY
        or min(near_misses.values()) < NEAR_MISS_RATIO * errors[shape]
    ):
        shape = NONE
    if len(blobs) > 1 or stray > MAX_STRAY:
        color = shape = NONE  # more than one shape: neither color nor shape is "the" one
    return ShapeReading(
        color, shape, background, bg_rgb, fg_rgb, area, errors, blobs=len(blobs), anisotropy=anisotropy,
        stray=stray, color_distance=color_distance, background_distance=bg_distance, near_misses=near_misses,
    )  # fmt: skip


# ---------------------------------------------------------------------------- public API


def _new_shapes(new_shapes: Sequence[str]) -> tuple[str, ...]:
    unknown = [s for s in new_shapes if s not in NEW_SHAPES]
    if unknown:
        raise ValueError(f"new shapes {unknown} unknown; the reader knows {', '.join(NEW_SHAPES)}")
    return tuple(new_shapes)


def read_batch(
    images: Any,
    colors: Palette | None = None,
    backgrounds: Palette | None = None,
    new_shapes: Sequence[str] = (),
) -> list[ShapeReading]:
    """``ShapeReading`` (label plus the measurements behind it) of each image; see ``classify_batch``."""
    color_palette = _palette(colors, COLORS)
    bg_palette = _palette(backgrounds, BACKGROUNDS)
    extra = _new_shapes(new_shapes)
    return [_read(image, color_palette, bg_palette, extra) for image in _images(images)]


def classify_batch(
    images: Any,
    colors: Palette | None = None,
    backgrounds: Palette | None = None,
    new_shapes: Sequence[str] = (),
) -> list[tuple[str, str, str]]:
    """``(color, shape, background)`` of each image.

    ``images``: a (B, 3, H, W) tensor or array -- uint8 in [0, 255], or float in [-1, 1]
    (the pipeline's and the dataset's ``pixel_values`` range; not [0, 1]) -- or a list of
    single images (tensors, arrays, PIL images); (B, H, W, 3) arrays work too.
    ``colors`` / ``backgrounds`` map names to (r, g, b) in 0..255 and default to the
    dataset's palettes. Images without a discernible shape give ``("none", "none", bg)``.
    ``new_shapes`` (of ``NEW_SHAPES``, e.g. ``("cross",)``) are read as shapes too: a model taught a
    new concept is scored with them.
    """
    return [reading.label for reading in read_batch(images, colors, backgrounds, new_shapes)]


def classify(
    image: Any, colors: Palette | None = None, backgrounds: Palette | None = None
) -> tuple[str, str, str]:
    """``(color, shape, background)`` of one image: (3, H, W) uint8 or [-1, 1] float tensor or
    array, (H, W, 3) array, or PIL image. See ``classify_batch``."""
    return _read(_single(image), _palette(colors, COLORS), _palette(backgrounds, BACKGROUNDS)).label


_CAPTION = re.compile(r"an? (?P<color>.+?) (?P<shape>\S+) on an? (?P<background>.+?) background\.?")


def parse_caption(
    caption: str,
    colors: Palette | None = None,
    backgrounds: Palette | None = None,
    new_shapes: Sequence[str] = (),
) -> tuple[str, str, str]:
    """``"a {color} {shape} on a {background} background"`` -> ``(color, shape, background)``.

    Case and surrounding whitespace are ignored, "an" may stand for "a". Raises
    ``ValueError`` for any other form or an unknown shape, and -- only where ``colors`` /
    ``backgrounds`` are given -- for a color or background outside them.
    """
    match = _CAPTION.fullmatch(" ".join(str(caption).lower().split()))
    if match is None:
        raise ValueError(
            f"caption {caption!r} is not of the form 'a {{color}} {{shape}} on a {{background}} background'"
        )
    color, shape, background = match["color"], match["shape"], match["background"]
    if shape not in (*SHAPES, *new_shapes):
        known = ", ".join((*SHAPES, *new_shapes))
        raise ValueError(f"caption {caption!r}: unknown shape {shape!r}; shapes: {known}")
    if colors is not None and color not in colors:
        raise ValueError(f"caption {caption!r}: color {color!r} is not in the palette ({', '.join(colors)})")
    if backgrounds is not None and background not in backgrounds:
        raise ValueError(
            f"caption {caption!r}: background {background!r} is not in the palette ({', '.join(backgrounds)})"
        )
    return color, shape, background


def caption_accuracy(
    images: Any,
    captions: Sequence[str],
    colors: Palette | None = None,
    backgrounds: Palette | None = None,
    new_shapes: Sequence[str] = (),
) -> dict[str, float | int]:
    """How often ``classify_batch(images)`` agrees with ``captions``.

    Returns ``{"accuracy": all three right, "color", "shape", "background": each alone,
    "n": number of images}`` (accuracies are NaN for no images). Raises ``ValueError`` when
    the counts differ or a caption names a color / background outside the palettes in use
    (pass ``colors=`` / ``backgrounds=`` to extend them).
    """
    if isinstance(captions, str):
        captions = [captions]
    colors = COLORS if colors is None else colors
    backgrounds = BACKGROUNDS if backgrounds is None else backgrounds
    truth = [parse_caption(c, colors, backgrounds, new_shapes) for c in captions]
    predicted = classify_batch(images, colors, backgrounds, new_shapes)
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} images but {len(truth)} captions")
    n = len(truth)
    if n == 0:
        nan = float("nan")
        return {"accuracy": nan, "color": nan, "shape": nan, "background": nan, "n": 0}
    hits = np.array(
        [
            [p == t for p, t in zip(pred, true, strict=True)]
            for pred, true in zip(predicted, truth, strict=True)
        ],
        dtype=bool,
    )
    return {
        "accuracy": float(hits.all(axis=1).mean()),
        "color": float(hits[:, 0].mean()),
        "shape": float(hits[:, 1].mean()),
        "background": float(hits[:, 2].mean()),
        "n": n,
    }
