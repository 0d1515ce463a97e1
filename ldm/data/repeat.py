"""``data.repeats``: a small dataset walked several times per epoch."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from ldm.data.transforms import split_key


class RepeatedDataset(Dataset):
    """Item i is item i mod n of ``base``; keys keep their augmentation seed, so each repeat of an
    image gets its own crop and flip. ``bucket_of`` repeats along."""

    def __init__(self, base: Dataset, times: int):
        if times < 1:
            raise ValueError(f"data.repeats is {times}; it must be at least 1")
        self.base, self.times, self.n = base, times, len(base)
        bucket_of = getattr(base, "bucket_of", None)
        self.bucket_of = None if bucket_of is None else list(bucket_of) * times

    def over(self, base: Dataset) -> RepeatedDataset:
        """The same repeats of another dataset of the same items (their latents)."""
        return RepeatedDataset(base, self.times)

    def __len__(self) -> int:
        return self.n * self.times

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, _ = split_key(key, len(self))
        return self.base[(index % self.n, key[1]) if isinstance(key, tuple) else index % self.n]

    def __repr__(self) -> str:
        return f"RepeatedDataset({self.base!r}, times={self.times})"
