"""Aspect-ratio bucketing: batches of one shape each, all shapes of about the same area.

Buckets are the sizes (w, h) with sides multiples of ``step`` (the latent factor times 8, so that
the UNet's downsamplings divide the latent evenly), area between half of and ``resolution**2`` and
aspect ratio within ``max_aspect``. Each image goes to the bucket nearest its aspect ratio (in log w/h), is
resized to cover it and cropped to it; a batch draws from one bucket only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ldm.core.errors import ConfigError, DataError


def make_buckets(resolution: int, step: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Sizes (w, h): w, h multiples of ``step``, resolution^2 / 2 < w h <= resolution^2 and
    1/max_aspect <= w/h <= max_aspect; for each width the tallest such height. Sorted by w/h."""
    if resolution % step:
        raise ConfigError(
            f"config key 'data.resolution' is {resolution}; with data.buckets=true it must be a multiple of "
            f"{step} (the latent factor x 8)"
        )
    area = resolution * resolution
    buckets = set()
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + 1, step):
        h = min(area // w, int(w * max_aspect)) // step * step
        if h >= step and w / h <= max_aspect and w * h > area // 2:
            buckets.update({(w, h), (h, w)})
    return sorted(buckets, key=lambda b: b[0] / b[1])


def nearest_bucket(buckets: Sequence[tuple[int, int]], width: int, height: int) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's, in |log(w/h) - log(bw/bh)|."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of ``(index, aug_seed)`` keys from one bucket each, forever, from batch ``start``.

    Epoch e: the items in a permutation seeded by (seed, e) are dealt into their buckets, each
    bucket cut into full batches (the rest waits for a later epoch's order), and the batches of all
    buckets shuffled together. With ``num_replicas > 1`` each rank takes every num_replicas-th batch.
    """

    def __init__(
        self,
        bucket_of: Sequence[int],
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        num_replicas: int = 1,
    ):
        counts: dict[int, int] = {}
        for b in bucket_of:
            counts[b] = counts.get(b, 0) + 1
        if not counts or max(counts.values()) < batch_size:
            raise DataError(
                f"no bucket holds a full batch of {batch_size} (bucket sizes: {sorted(counts.values())}); "
                "lower train.batch_size, add images or raise data.repeats"
            )
        self.bucket_of = list(bucket_of)
        self.batch_size = batch_size
        self.seed, self.start, self.rank, self.num_replicas = seed, start, rank, num_replicas

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        pools: dict[int, list[int]] = {}
        for i in torch.randperm(len(self.bucket_of), generator=generator).tolist():
            pools.setdefault(self.bucket_of[i], []).append(i)
        batches = [
            pool[k : k + self.batch_size]
            for pool in pools.values()
            for k in range(0, len(pool) - self.batch_size + 1, self.batch_size)
        ]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[k] for k in order]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position, epoch, done = self.start + self.rank, 0, 0  # position: global batch index
        batches = self.epoch_batches(epoch)
        while True:
            while position - done >= len(batches):
                done += len(batches)
                epoch += 1
                batches = self.epoch_batches(epoch)
            batch = batches[position - done]
            yield [
                (i, (self.seed * 1_000_003 + position * self.batch_size + k) % (2**63 - 1))
                for k, i in enumerate(batch)
            ]
            position += self.num_replicas

    def __len__(self) -> int:  # an endless stream
        return 2**62
