"""The built-in ``shapes`` dataset: one filled shape on a plain background, captioned.

Each item is ``"a {color} {shape} on a {background} background"`` with an image of
that shape, whose size (bounding box 35% to 70% of the image side) and position
(wholly inside the image) are random and not captioned. Item ``i`` of a split is a
pure function of ``(seed, split, i)`` (and of ``holdout`` for the train split): the
same in every process, at any resolution, whether rendered alone or in a batch.

Randomness comes from a counter-based hash (SplitMix64) of ``(seed, split, i, slot)``
rather than a stateful generator, so any set of items is drawn in one vectorised step.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.core.errors import ConfigError
from ldm.data.transforms import micro_conditions, split_key

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (230, 220, 30),
    "green": (30, 200, 30),
    "cyan": (30, 210, 220),
    "blue": (30, 60, 230),
    "magenta": (220, 30, 220),
}
SHAPES: dict[str, int] = {"circle": 0, "square": 1, "triangle": 2}  # name -> shape id used by `render`
# shapes `render` draws that no dataset item has: new concepts to teach a trained model (the export
# tool's --shape). cross: a plus sign, arms CROSS_ARM x its side thick
NEW_SHAPES: dict[str, int] = {"cross": 3}
CROSS_ARM = 1 / 3
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}
SPLITS: dict[str, int] = {"train": 0, "val": 1}  # split -> stream code in the hash

MIN_SIZE, MAX_SIZE = 0.35, 0.70  # bounding-box side as a fraction of the image side
TRIANGLE_ASPECT = math.sqrt(3) / 2  # height / width of an equilateral triangle
SUPERSAMPLE = 4  # anti-aliasing: SUPERSAMPLE x SUPERSAMPLE coverage samples per pixel
RENDER_CHUNK_SAMPLES = 1 << 22  # (sample row, pixel column) pairs per vectorised render step
CACHE_CHUNK = 1024  # items rendered together on first access
CACHE_MAX_BYTES = 1 << 30  # keep rendered items in memory when the whole split fits in this


def caption(color: str, shape: str, background: str) -> str:
    """The caption of an item: ``"a {color} {shape} on a {background} background"`` ("an" before a vowel)."""
    article = "an" if color[:1] in "aeiou" else "a"
    return f"{article} {color} {shape} on a {background} background"


@dataclass(frozen=True)
class ShapeSpec:
    """One item: what is drawn and where, independent of resolution.

    ``size`` is the side of the shape's bounding box as a fraction of the image side
    (the triangle's box is ``size`` wide and ``size * sqrt(3) / 2`` high);
    ``cx, cy`` is the centre of that box in fractions of the image (y points down).
    """

    color: str
    shape: str
    background: str
    size: float
    cx: float
    cy: float

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.background)


def half_extent(shape: str, size: float) -> tuple[float, float]:
    """Half the bounding box's (width, height) of ``shape`` at ``size``."""
    height = size * TRIANGLE_ASPECT if shape == "triangle" else size
    return size / 2, height / 2


def allowed_combos(split: str, holdout: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The (color, shape) pairs drawn in ``split``: all of them, less ``holdout`` in train.

    Raises ``ValueError`` for an unknown split or holdout entry, or a holdout of everything.
    """
    if split not in SPLITS:
        raise ValueError(f"split is {split!r}; allowed: {' | '.join(SPLITS)}")
    held: set[tuple[str, str]] = set()
    for entry in holdout:
        words = str(entry).lower().split()
        if len(words) != 2 or words[0] not in COLORS or words[1] not in SHAPES:
            raise ConfigError(
                f"data.holdout entry {entry!r} is not 'color shape'; colors: {', '.join(COLORS)}; "
                f"shapes: {', '.join(SHAPES)} (e.g. 'red circle')"
            )
        held.add((words[0], words[1]))
    combos = [(c, s) for c in COLORS for s in SHAPES if split != "train" or (c, s) not in held]
    if not combos:
        raise ConfigError("data.holdout removes every (color, shape) pair from the train split")
    return combos


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014): a bijective 64-bit mix, vectorised."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, split: str, indices: np.ndarray, slots: int) -> np.ndarray:
    """Uniform [0, 1) float64 (N, slots), a pure function of (seed, split, index, slot)."""
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(SPLITS[split]))
    per_item = _splitmix64(key ^ indices.astype(np.uint64))  # (N,)
    bits = _splitmix64(per_item[:, None] ^ np.arange(slots, dtype=np.uint64)[None, :])  # (N, slots)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def shape_specs(
    seed: int, split: str, indices: Sequence[int] | np.ndarray, holdout: Collection[str] = ()
) -> list[ShapeSpec]:
    """``shape_spec`` for many indices at once (same results, vectorised)."""
    combos = allowed_combos(split, holdout)
    index_array = np.asarray(indices, dtype=np.int64).reshape(-1)
    if index_array.size and index_array.min() < 0:
        raise ValueError("shape indices must be non-negative")
    u = _uniforms(seed, split, index_array, 5)  # (N, 5): combo, background, size, x, y
    combo_ids = np.minimum((u[:, 0] * len(combos)).astype(np.int64), len(combos) - 1)
    backgrounds = list(BACKGROUNDS)
    bg_ids = np.minimum((u[:, 1] * len(backgrounds)).astype(np.int64), len(backgrounds) - 1)
    sizes = MIN_SIZE + u[:, 2] * (MAX_SIZE - MIN_SIZE)
    specs = []
    for k in range(index_array.size):
        color, shape = combos[combo_ids[k]]
        size = float(sizes[k])
        half_w, half_h = half_extent(shape, size)
        cx = half_w + float(u[k, 3]) * (1.0 - 2.0 * half_w)  # keeps the box inside [0, 1]
        cy = half_h + float(u[k, 4]) * (1.0 - 2.0 * half_h)
        specs.append(ShapeSpec(color, shape, backgrounds[bg_ids[k]], size, cx, cy))
    return specs


def crop_windows(
    seed: int, split: str, indices: np.ndarray, resolution: int, margin: int
) -> tuple[np.ndarray, np.ndarray]:
    """(canvas side S (N,), crop (top, left) (N, 2)) per item, int64, a pure function of (seed, split,
    index): half the items S = R, uncropped; the others S uniform in R+1..R+margin, the R x R window at
    a uniform position. Slots 5..7 of the item's hash (the spec takes 0..4)."""
    u = _uniforms(seed, split, np.asarray(indices, dtype=np.int64).reshape(-1), 8)[:, 5:]  # (N, 3)
    extra = np.where(
        u[:, 0] < 0.5, 0, 1 + np.minimum((u[:, 0] * 2 - 1) * margin, margin - 1).astype(np.int64)
    )
    extra = extra if margin > 0 else np.zeros_like(extra)
    crop = np.minimum((u[:, 1:] * (extra[:, None] + 1)).astype(np.int64), extra[:, None])  # (N, 2)
    return resolution + extra, crop


def cropped_spec(spec: ShapeSpec, canvas: int, top: int, left: int, resolution: int) -> ShapeSpec:
    """The spec drawn on a ``canvas`` x ``canvas`` image, seen through its R x R window at (top, left):
    the same shape, scaled by canvas / R and shifted (it may run off the window's edge)."""
    scale = canvas / resolution
    return ShapeSpec(
        spec.color, spec.shape, spec.background, spec.size * scale,
        spec.cx * scale - left / resolution, spec.cy * scale - top / resolution,
    )  # fmt: skip


def shape_spec(seed: int, split: str, index: int, holdout: Collection[str] = ()) -> ShapeSpec:
    """Item ``index`` of ``split``: (color, shape) uniform over ``allowed_combos``, background,
    size in [MIN_SIZE, MAX_SIZE] and a position keeping the shape inside the image, all uniform."""
    return shape_specs(seed, split, [index], holdout)[0]


def _row_spans(specs: Sequence[ShapeSpec], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The x-interval [lo, hi] each shape covers on each of ``rows`` sample rows, float32 (N, rows).

    Rows the shape misses get an empty interval (lo > hi). Coordinates are fractions of
    the image side, y pointing down.
    """
    v = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows  # (rows,) sample row positions
    cx = torch.tensor([s.cx for s in specs], dtype=torch.float32)[:, None]  # (N, 1)
    cy = torch.tensor([s.cy for s in specs], dtype=torch.float32)[:, None]
    half = torch.tensor([s.size / 2 for s in specs], dtype=torch.float32)[:, None]
    shape_ids = torch.tensor([{**SHAPES, **NEW_SHAPES}[s.shape] for s in specs])[:, None]
    dy = v[None, :] - cy  # (N, rows)

    # circle: disc of radius size / 2 -> half-width sqrt(r^2 - dy^2)
    circle_w = torch.where(dy * dy <= half * half, torch.sqrt((half * half - dy * dy).clamp(min=0)), -1.0)
    # square: axis-aligned, side size -> half-width size / 2
    square_w = torch.where(dy.abs() <= half, half.expand_as(dy), -1.0)
    # triangle: upward equilateral of width size, apex at the top of its box (height size*sqrt(3)/2)
    # -> half-width grows from 0 at the apex by 1/sqrt(3) per unit of depth
    half_height = half * TRIANGLE_ASPECT
    depth = dy + half_height
    triangle_w = torch.where((depth >= 0) & (dy <= half_height), depth / math.sqrt(3), -1.0)

    # cross: a plus sign of side size, arms CROSS_ARM x size thick -> full width within the
    # horizontal arm, the vertical arm's half thickness elsewhere inside the box
    arm = half * CROSS_ARM
    cross_w = torch.where(
        dy.abs() <= arm, half.expand_as(dy), torch.where(dy.abs() <= half, arm.expand_as(dy), -1.0)
    )
    width = torch.where(shape_ids == SHAPES["square"], square_w, triangle_w)
    width = torch.where(shape_ids == NEW_SHAPES["cross"], cross_w, width)
    width = torch.where(shape_ids == SHAPES["circle"], circle_w, width)  # (N, rows); -1: row misses the shape
    return cx - width, cx + width


def _coverage(specs: Sequence[ShapeSpec], resolution: int, supersample: int) -> torch.Tensor:
    """Covered samples per pixel, int32 (N, R, R) in [0, supersample**2].

    Samples sit on a regular (R*S) x (R*S) grid at ((j + 0.5) / (R*S), (k + 0.5) / (R*S)).
    Each sample row meets a shape in one interval, so the samples covered in a pixel are
    counted from interval ends instead of testing every sample.
    """
    rs = resolution * supersample
    lo, hi = _row_spans(specs, rs)  # (N, RS)
    first = torch.ceil(lo * rs - 0.5).to(torch.int32)  # first sample column j with u_j >= lo
    end = torch.floor(hi * rs - 0.5).to(torch.int32) + 1  # one past the last column with u_j <= hi
    pixel_start = torch.arange(resolution, dtype=torch.int32) * supersample  # (R,) first column of each pixel
    stop = torch.minimum(end[:, :, None], pixel_start + supersample)  # (N, RS, R)
    start = torch.maximum(first[:, :, None], pixel_start)
    # covered samples of each sample row in each pixel column
    per_row = (stop - start).clamp_(min=0)  # (N, RS, R)
    per_row = per_row.view(len(specs), resolution, supersample, resolution)
    return per_row.sum(dim=2, dtype=torch.int32)  # (N, R, R)


def render(
    specs: Sequence[ShapeSpec],
    resolution: int,
    supersample: int = SUPERSAMPLE,
    colors: dict[str, tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """Draw ``specs`` as uint8 images (N, 3, R, R), anti-aliased by supersampling; ``colors``
    (default ``COLORS``) may add colors, e.g. ``{**COLORS, "orange": (240, 140, 30)}``.

    Each pixel blends shape color over background by the fraction of its
    ``supersample**2`` sample points inside the shape, in exact integer arithmetic, so
    an item's pixels do not depend on the batch it is drawn in.
    """
    n = len(specs)
    out = torch.empty(n, 3, resolution, resolution, dtype=torch.uint8)
    samples = supersample * supersample
    chunk = max(1, RENDER_CHUNK_SAMPLES // (resolution * supersample * resolution))
    for start in range(0, n, chunk):
        part = specs[start : start + chunk]
        covered = _coverage(part, resolution, supersample)[:, None]  # (B, 1, R, R)
        fg = torch.tensor([(colors or COLORS)[s.color] for s in part])[:, :, None, None]  # (B, 3, 1, 1) int64
        bg = torch.tensor([BACKGROUNDS[s.background] for s in part])[:, :, None, None]
        blended = (fg * covered.long() + bg * (samples - covered) + samples // 2) // samples  # (B, 3, R, R)
        out[start : start + chunk] = blended.to(torch.uint8)
    return out


class ShapesDataset(Dataset):
    """``size`` items of the shapes ``split`` at ``resolution``, rendered lazily in chunks.

    ``dataset[i]`` or ``dataset[(i, aug_seed)]`` -> ``{"pixel_values": float32 (3, R, R)
    in [-1, 1], "caption": str}``; with ``flip`` and an ``aug_seed`` the image is mirrored
    with p = 0.5 (the caption still holds). ``holdout`` lists "color shape" pairs that the
    train split never draws; the val split draws all pairs.

    ``crop_margin`` > 0: half the items are drawn on a larger canvas (up to R + margin) and cropped
    to an R x R window (``crop_windows``), so that the items' ``original_size`` and ``crop_top_left``
    (SDXL's micro-conditioning, in every item) vary, each a pure function of the item.
    """

    def __init__(
        self,
        size: int,
        resolution: int = 32,
        seed: int = 0,
        split: str = "train",
        holdout: Collection[str] = (),
        flip: bool = False,
        crop_margin: int = 0,
    ) -> None:
        if crop_margin < 0:
            raise ValueError(f"crop_margin must be >= 0, got {crop_margin}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        allowed_combos(split, holdout)  # validates split and holdout
        self.size = size
        self.resolution = resolution
        self.seed = seed
        self.split = split
        self.holdout = tuple(holdout)
        self.flip = flip
        self.crop_margin = crop_margin
        self._cache_enabled = size * 3 * resolution * resolution <= CACHE_MAX_BYTES
        self._chunks: dict[int, tuple[list[ShapeSpec], torch.Tensor]] = {}
        # False: keep only the newest chunk of rendered images, for one pass in order (latent caching)
        self.keep_rendered = True

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(size={self.size}, resolution={self.resolution}, seed={self.seed}, "
            f"split={self.split!r}, holdout={list(self.holdout)}, flip={self.flip}, crop_margin={self.crop_margin})"
        )

    def spec(self, i: int) -> ShapeSpec:
        """What item ``i`` shows (a pure function of seed, split, i and holdout)."""
        index, _ = split_key(i, self.size)
        return self.specs([index])[0]

    def specs(self, indices: Sequence[int] | None = None) -> list[ShapeSpec]:
        """``spec`` for ``indices`` (default: every item), vectorised; as seen through the crop window."""
        idx = np.arange(self.size) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise IndexError(f"indices out of range for a dataset of {self.size} items")
        specs = shape_specs(self.seed, self.split, idx, self.holdout)
        if not self.crop_margin:
            return specs
        canvas, crop = crop_windows(self.seed, self.split, idx, self.resolution, self.crop_margin)
        return [
            cropped_spec(spec, int(c), int(t), int(left), self.resolution)
            for spec, c, (t, left) in zip(specs, canvas, crop, strict=True)
        ]

    def micro(self, index: int) -> dict[str, torch.Tensor]:
        """Item ``index``'s ``original_size`` (S, S) and ``crop_top_left`` (top, left); (R, R), (0, 0) uncropped."""
        canvas, crop = crop_windows(
            self.seed, self.split, np.array([index]), self.resolution, self.crop_margin
        )
        return micro_conditions((int(canvas[0]),) * 2, (int(crop[0, 0]), int(crop[0, 1])))

    def _chunk(self, chunk_id: int) -> tuple[list[ShapeSpec], torch.Tensor]:
        if chunk_id not in self._chunks:
            if not self.keep_rendered:
                self._chunks.clear()
            start = chunk_id * CACHE_CHUNK
            specs = self.specs(range(start, min(start + CACHE_CHUNK, self.size)))
            self._chunks[chunk_id] = (specs, render(specs, self.resolution))
        return self._chunks[chunk_id]

    def image(self, i: int) -> tuple[ShapeSpec, torch.Tensor]:
        """Item ``i``'s spec and its uint8 image (3, R, R), unflipped."""
        index, _ = split_key(i, self.size)
        if not self._cache_enabled:
            spec = self.spec(index)
            return spec, render([spec], self.resolution)[0]
        specs, images = self._chunk(index // CACHE_CHUNK)
        return specs[index % CACHE_CHUNK], images[index % CACHE_CHUNK]

    def render_all(self) -> torch.Tensor:
        """Every item's uint8 image (N, 3, R, R), unflipped, in index order."""
        if not self._cache_enabled:
            return render(self.specs(), self.resolution)
        if self.size == 0:
            return torch.empty(0, 3, self.resolution, self.resolution, dtype=torch.uint8)
        n_chunks = -(-self.size // CACHE_CHUNK)
        return torch.cat([self._chunk(c)[1] for c in range(n_chunks)])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | str]:
        index, generator = split_key(key, self.size)
        spec, image = self.image(index)
        x = image.float().div(127.5).sub(1.0)  # (3, R, R) in [-1, 1]
        micro = self.micro(index)
        if self.flip and generator is not None and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
            micro["crop_top_left"][1] = (
                micro["original_size"][1] - self.resolution - micro["crop_top_left"][1]
            )
        return {"pixel_values": x, "caption": spec.caption, **micro}
