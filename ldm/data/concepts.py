"""Concept datasets (``data.dataset=sources``): several image sources in one run, as kohya's dataset
configs and DreamBooth have them.

The distinct items of every source sit once in a ``Concatenated`` dataset (what the latent cache
encodes); a ``SourceView`` walks it in positions, each position naming a distinct item and its source:

- train sources only: each source's items ``repeats`` times, one source after another (the sampler
  shuffles the positions);
- with regularization sources (DreamBooth's prior preservation, Ruiz et al. 2023): pairs. Position
  2k is train position k mod T, 2k+1 regularization position k mod R, for k < max(T, R) (T, R: the
  two roles' positions with repeats), as diffusers' DreamBooth example pairs each instance image with
  a class image. The view's ``group`` is 2: the sampler keeps a pair together, so that every batch of
  an even size holds as many class images as instance images.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ldm.data.transforms import split_key

SOURCE_KEY = "source"  # an item's source index, in the batches of a concept dataset


class Concatenated(Dataset):
    """The items of ``parts`` one after another; keys keep their augmentation seed. ``bucket_of``
    and ``captions`` concatenate the parts' where every part has them."""

    def __init__(self, parts: Sequence[Dataset]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).tolist()
        buckets = [getattr(p, "bucket_of", None) for p in self.parts]
        self.bucket_of = None if any(b is None for b in buckets) else [b for bs in buckets for b in bs]
        captions = [getattr(p, "captions", None) for p in self.parts]
        self.captions = None if any(c is None for c in captions) else [c for cs in captions for c in cs]

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(part, index in the part) of item ``index``."""
        part = bisect.bisect_right(self.offsets, index) - 1
        return part, index - self.offsets[part]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, _ = split_key(key, len(self))
        part, local = self.locate(index)
        return self.parts[part][(local, key[1]) if isinstance(key, tuple) else local]

    def __repr__(self) -> str:
        return f"Concatenated({', '.join(repr(p) for p in self.parts)})"


def source_positions(sizes: Sequence[int], repeats: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(distinct item, source) of every position of the sources with ``sizes`` items walked
    ``repeats`` times each, source after source: int64 arrays of length sum(size * repeats)."""
    offsets = np.cumsum([0, *sizes])
    items = [np.tile(np.arange(offsets[s], offsets[s + 1]), r) for s, r in enumerate(repeats)]
    sources = [np.full(n * r, s) for s, (n, r) in enumerate(zip(sizes, repeats, strict=True))]
    return np.concatenate(items).astype(np.int64), np.concatenate(sources).astype(np.int64)


def paired_positions(
    train: tuple[np.ndarray, np.ndarray], prior: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Interleave (item, source) positions of the two roles as pairs: 2k from ``train`` (k mod T),
    2k+1 from ``prior`` (k mod R), for k < max(T, R)."""
    pairs = max(len(train[0]), len(prior[0]))
    k = np.arange(pairs)
    out = []
    for column in range(2):
        both = np.empty(2 * pairs, dtype=np.int64)
        both[0::2] = train[column][k % len(train[0])]
        both[1::2] = prior[column][k % len(prior[0])]
        out.append(both)
    return out[0], out[1]


class SourceView(Dataset):
    """Position p: item ``items[p]`` of ``base`` with ``{"source": sources[p]}``. ``group``: how many
    consecutive positions the sampler keeps together (2 for DreamBooth's pairs)."""

    def __init__(self, base: Dataset, items: np.ndarray, sources: np.ndarray, group: int = 1):
        if len(items) % group:
            raise ValueError(f"{len(items)} positions do not split into groups of {group}")
        self.base, self.items, self.sources, self.group = base, items, sources, group
        bucket_of = getattr(base, "bucket_of", None)
        self.bucket_of = None if bucket_of is None else [bucket_of[i] for i in items.tolist()]

    def over(self, base: Dataset) -> SourceView:
        """The same positions over another dataset of the same distinct items (their latents)."""
        return SourceView(base, self.items, self.sources, self.group)

    def source_counts(self, n: int) -> list[int]:
        """Positions of each of the ``n`` sources (an epoch's items from it)."""
        return np.bincount(self.sources, minlength=n).tolist()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, _ = split_key(key, len(self))
        item = int(self.items[index])
        got = self.base[(item, key[1]) if isinstance(key, tuple) else item]
        return {**got, SOURCE_KEY: int(self.sources[index])}

    def __repr__(self) -> str:
        return f"SourceView({self.base!r}, positions={len(self)}, group={self.group})"
