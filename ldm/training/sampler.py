"""A resumable, deterministic order of training items.

Epoch ``e`` visits the items in the permutation drawn from ``seed + e``; item keys carry
an augmentation seed, so that random crops and flips depend only on (seed, position) and
a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ldm.core.errors import DataError


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, aug_seed)`` forever, starting at global position ``start``.

    With ``num_replicas > 1`` each rank takes every ``num_replicas``-th position, so the
    ranks together walk the same global order as one process would. With ``group`` g > 1 the
    permutation moves groups of g consecutive indices (``num_items`` a multiple of g), each
    group's items at g consecutive positions: a global batch of a multiple of g items starting
    at a multiple of g holds whole groups (DreamBooth's instance/class pairs).
    """

    def __init__(
        self, num_items: int, seed: int, start: int = 0, rank: int = 0, num_replicas: int = 1, group: int = 1
    ):
        if num_items < 1:
            raise DataError("the training dataset is empty: check data.path (or data.split)")
        if num_items % group:
            raise ValueError(f"{num_items} items do not split into groups of {group}")
        self.num_items = num_items
        self.seed = seed
        self.start = start
        self.rank = rank
        self.num_replicas = num_replicas
        self.group = group

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items // self.group, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self.group
        position = self.start + self.rank
        epoch = position // self.num_items
        order = self._permutation(epoch)
        while True:
            if position // self.num_items != epoch:
                epoch = position // self.num_items
                order = self._permutation(epoch)
            p = position % self.num_items
            index = int(order[p // g]) * g + p % g  # (g = 1: order[p])
            yield index, (self.seed * 1_000_003 + position) % (2**63 - 1)
            position += self.num_replicas

    def __len__(self) -> int:  # an endless stream; DataLoader only needs a number
        return 2**62
