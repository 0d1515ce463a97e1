"""Walking the first items of a map-style dataset in stacked batches (evaluation, caching)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset


def item_batches(dataset: Dataset, n: int, batch_size: int) -> Iterator[list[dict]]:
    """Items 0..n-1 (unaugmented: plain integer keys), ``batch_size`` at a time."""
    for start in range(0, n, batch_size):
        yield [dataset[i] for i in range(start, min(n, start + batch_size))]


def image_batches(dataset: Dataset, n: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The ``pixel_values`` of items 0..n-1, stacked: (b, 3, H, W) in [-1, 1]."""
    for items in item_batches(dataset, n, batch_size):
        yield torch.stack([item["pixel_values"] for item in items])
