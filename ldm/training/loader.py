"""Endless, resumable streams of training batches, for map-style and streamed datasets alike."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.core.errors import DataError
from ldm.data.buckets import BucketBatchSampler
from ldm.training.sampler import ResumableSampler


class TrainBatches:
    """``next(batches)`` gives the next training batch, forever; ``state_dict()`` says where it is.

    Map-style datasets are walked in ``ResumableSampler`` order, or ``BucketBatchSampler``'s when
    the dataset has ``bucket_of`` (``position`` = items consumed by all processes together). A
    streamed dataset is re-read epoch after epoch, reshuffled by ``set_epoch``; its state is
    (epoch, items this process consumed in it). Either way a resumed run sees the same batches as
    an uninterrupted one.
    """

    def __init__(
        self,
        dataset: Dataset | IterableDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        state: dict[str, int] | None = None,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.streaming = isinstance(dataset, IterableDataset)
        self.state = {"position": 0, "epoch": 0, "offset": 0, **(state or {})}
        self._loader_args = dict(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0 and not self.streaming,
            drop_last=True,
            # a generator of its own keeps iter() off the global RNG, so resume is exact
            generator=torch.Generator().manual_seed(seed),
        )
        self._iterator = self._start()

    def _start(self) -> Iterator[dict[str, Any]]:
        if self.streaming:
            self.dataset.rank, self.dataset.world_size = self.rank, self.world_size
            self.dataset.set_epoch(self.state["epoch"])
            self.dataset.skip = self.state["offset"]
            return iter(DataLoader(self.dataset, **self._loader_args))
        bucket_of = getattr(self.dataset, "bucket_of", None)
        if bucket_of is not None:  # aspect-ratio buckets: one bucket per batch
            start = self.state["position"] // self.batch_size  # global batches done
            batches = BucketBatchSampler(
                bucket_of, self.batch_size, self.seed, start, self.rank, self.world_size
            )
            args = {k: v for k, v in self._loader_args.items() if k not in ("batch_size", "drop_last")}
            return iter(DataLoader(self.dataset, batch_sampler=batches, **args))
        sampler = ResumableSampler(
            len(self.dataset), self.seed, self.state["position"], self.rank, self.world_size,
            getattr(self.dataset, "group", 1),  # DreamBooth's pairs (ldm.data.concepts)
        )  # fmt: skip
        return iter(DataLoader(self.dataset, sampler=sampler, **self._loader_args))

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self.streaming:
            batch = next(self._iterator)
            self.state["position"] += self.batch_size * self.world_size
            return batch
        for _ in range(2):  # at most one epoch boundary per batch
            try:
                batch = next(self._iterator)
            except StopIteration:
                self.state["epoch"] += 1
                self.state["offset"] = 0
                self._iterator = self._start()
                continue
            self.state["offset"] += self.batch_size
            self.state["position"] += self.batch_size * self.world_size
            return batch
        raise DataError(
            "the streamed training dataset yields fewer items than one batch: lower train.batch_size "
            "or add data"
        )

    def state_dict(self) -> dict[str, int]:
        return dict(self.state)
