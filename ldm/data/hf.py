"""Image-caption datasets from the ``datasets`` library: hub names, local scripts or
folders (``load_dataset``), saved datasets (``load_from_disk``), map-style or streamed.

Image cells may be PIL images, ``{"bytes": ..., "path": ...}`` dicts (``datasets.Image``
with ``decode=False``, which we use so that decoding goes through ``load_rgb``), raw
bytes or file paths. Caption cells may be strings, None (-> "") or lists of strings
(one is picked: at random with an augmentation generator, else the first).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset

from ldm.core.errors import DataError
from ldm.data.transforms import MIN_IMAGE_SIDE, ImageTransform, check_pixels, load_rgb, split_key, to_rgb

logger = logging.getLogger(__name__)

STREAM_SHARDS = 64  # shards of a streamed saved dataset (shard order is shuffled; workers split them)


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def _names_a_local_path(name: str) -> bool:
    """Whether ``data.path`` is written as a path (absolute, ./, ../, ~) rather than a hub name."""
    return Path(name).is_absolute() or name.startswith((".", "~"))


def load_hf_dataset(
    path: str | Path, split: str, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a dataset: ``load_from_disk`` for a saved dataset folder, else ``load_dataset``.

    A saved single ``Dataset`` (not a ``DatasetDict``) serves as ``train`` or as the split it
    was saved from. Raises ``DataError`` for a path or hub name that cannot be found, and naming
    the available splits when ``split`` is absent.
    """
    if _names_a_local_path(str(path)):
        path = str(Path(path).expanduser())
    if _names_a_local_path(str(path)) and not Path(path).exists():
        raise DataError(
            f"data.path={path}: no such folder; give a save_to_disk folder, a folder of data files "
            "or a hub name (org/name)"
        )
    if not is_saved_dataset(path):
        try:
            return datasets.load_dataset(str(path), split=split, streaming=streaming)
        except (FileNotFoundError, ConnectionError) as err:  # datasets: no such dataset, or no hub
            raise DataError(f"data.path={path}: {err}") from err
        except ValueError as err:
            if "split" in str(err).lower():  # datasets says which splits exist
                raise DataError(f"dataset {path}: {err} (set data.split / data.val_split)") from err
            raise
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"saved dataset {path} has no split {split!r}; splits: {', '.join(loaded)} "
                "(set data.split / data.val_split)"
            )
        dataset = loaded[split]
    else:
        own = str(loaded.split) if loaded.split is not None else None
        if split not in ("train", own):
            raise DataError(
                f"saved dataset {path} is a single split ({own or 'unnamed'}), not a DatasetDict; "
                f"it cannot provide split {split!r} (leave data.val_split unset to hold items out of it)"
            )
        dataset = loaded
    if streaming:
        return dataset.to_iterable_dataset(num_shards=max(1, min(STREAM_SHARDS, len(dataset))))
    return dataset


def check_columns(
    dataset: datasets.Dataset | datasets.IterableDataset, image_column: str, caption_column: str
) -> None:
    """Raise ``DataError`` listing the available columns if either column is missing.

    Streams whose columns are unknown until read are not checked here.
    """
    names = dataset.column_names
    if names is None:
        return
    missing = [c for c in (image_column, caption_column) if c not in names]
    if missing:
        raise DataError(
            f"dataset has no column {', '.join(repr(c) for c in missing)}; available columns: "
            f"{', '.join(names)} (set data.image_column / data.caption_column)"
        )


def _undecoded(dataset: Any, image_column: str, caption_column: str) -> Any:
    """Keep the two columns and have ``datasets.Image`` cells arrive as bytes/path dicts."""
    dataset = dataset.select_columns([image_column, caption_column])
    features = dataset.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def decode_image(value: Any) -> Image.Image:
    """An image cell (PIL image, bytes/path dict, bytes or path) -> 8-bit RGB PIL image; an image
    with a side under ``MIN_IMAGE_SIDE`` raises ``ImageTooSmallError`` (the dataset skips it)."""
    if isinstance(value, Image.Image):
        check_pixels(*value.size, MIN_IMAGE_SIDE)
        return to_rgb(ImageOps.exif_transpose(value))
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return load_rgb(io.BytesIO(value["bytes"]), MIN_IMAGE_SIDE)
        if value.get("path"):
            return load_rgb(value["path"], MIN_IMAGE_SIDE)
        raise ValueError(f"image cell has neither bytes nor path: keys {sorted(value)}")
    if isinstance(value, (bytes, bytearray)):
        return load_rgb(io.BytesIO(value), MIN_IMAGE_SIDE)
    if isinstance(value, (str, Path)):
        return load_rgb(value, MIN_IMAGE_SIDE)
    raise TypeError(f"cannot read an image from a cell of type {type(value).__name__}")


def image_size(value: Any) -> tuple[int, int]:
    """(width, height) of an image cell, reading only the header of bytes and files."""
    if isinstance(value, Image.Image):
        return value.size
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value
    with Image.open(source) as image:
        return image.size


def pick_caption(value: Any, generator: torch.Generator | None = None) -> str:
    """A caption cell -> str: None -> "", a list -> one of its entries."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        if not value:
            return ""
        k = int(torch.randint(len(value), (1,), generator=generator)) if generator is not None else 0
        return pick_caption(value[k])
    return str(value)


class HFImageDataset(Dataset):
    """A map-style ``datasets.Dataset`` of images and captions, as tensors.

    ``dataset[i]`` or ``dataset[(i, aug_seed)]`` -> ``{"pixel_values": float32 (3, R, R)
    in [-1, 1], "caption": str}``. A cell that fails to decode is reported once and
    replaced by the next readable item.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        resolution: int,
        crop: str = "center",
        flip: bool = False,
        image_column: str = "image",
        caption_column: str = "text",
    ) -> None:
        check_columns(dataset, image_column, caption_column)
        self.dataset = _undecoded(dataset, image_column, caption_column)
        self.image_column = image_column
        self.caption_column = caption_column
        self.transform = ImageTransform(resolution, crop, flip)
        self.target_sizes: list[tuple[int, int]] | None = None  # (w, h) per item when bucketed
        self._broken: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every item's image, from its header where the cell has bytes or a path."""
        sizes = []
        for value in self.dataset[self.image_column]:
            try:
                sizes.append(image_size(value))
            except Exception:  # unreadable: __getitem__ reports it and uses the next item
                sizes.append((1, 1))
        return sizes

    def __repr__(self) -> str:
        return f"HFImageDataset(items={len(self)}, transform={self.transform})"

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | str]:
        n = len(self.dataset)
        index, generator = split_key(key, n)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._broken:
                continue
            row = self.dataset[i]
            try:
                image = decode_image(row[self.image_column])
            except Exception as err:  # any decode failure: report it, then use the next item
                self._broken.add(i)
                logger.warning("cannot decode image of item %d (%r); using the next item", i, err)
                continue
            caption = pick_caption(row[self.caption_column], generator)
            size = self.target_sizes[index] if self.target_sizes is not None else None
            pixels, micro = self.transform.apply(image, generator, size)
            return {"pixel_values": pixels, "caption": caption, **micro}
        raise DataError(f"none of the {n} images of the dataset could be decoded")


def _aug_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, worker, position)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class HFStreamingDataset(IterableDataset):
    """A streamed ``datasets.IterableDataset`` of images and captions, yielding the item dicts.

    Shuffles with ``datasets``' buffer shuffle (``seed``, reshuffled by ``set_epoch``),
    splits the stream across ``world_size`` processes, and skips the first ``skip``
    items of this process's stream (set ``skip`` to the items already consumed to resume).
    Augmentation draws from a generator seeded by (seed, epoch, rank, worker, position in
    the stream), so a resumed stream repeats the same crops and flips. Exact resumption
    assumes at most one DataLoader worker; with more, each worker streams its own shards.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        resolution: int,
        crop: str = "center",
        flip: bool = False,
        image_column: str = "image",
        caption_column: str = "text",
        seed: int = 0,
        shuffle_buffer: int = 1000,  # 0: keep the stream's order
        skip: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_columns(dataset, image_column, caption_column)
        self.dataset = _undecoded(dataset, image_column, caption_column)
        self.image_column = image_column
        self.caption_column = caption_column
        self.transform = ImageTransform(resolution, crop, flip)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.skip = skip
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (the shuffle seed becomes seed + epoch)."""
        self.epoch = epoch

    def __repr__(self) -> str:
        return (
            f"HFStreamingDataset(seed={self.seed}, shuffle_buffer={self.shuffle_buffer}, skip={self.skip}, "
            f"rank={self.rank}/{self.world_size}, transform={self.transform})"
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | str]]:
        stream = self.dataset
        if self.shuffle_buffer > 0:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            stream.set_epoch(self.epoch)
        if self.world_size > 1:
            stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        if self.skip:
            stream = stream.skip(self.skip)
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        augment = self.transform.crop == "random" or self.transform.flip
        for position, row in enumerate(stream, start=self.skip):
            generator = None
            if augment:
                seed = _aug_seed(self.seed, self.epoch, self.rank, worker_id, position)
                generator = torch.Generator().manual_seed(seed)
            try:
                image = decode_image(row[self.image_column])
            except Exception as err:  # any decode failure: report it, then go on
                logger.warning("cannot decode image of stream item %d (%r); skipping it", position, err)
                continue
            caption = pick_caption(row[self.caption_column], generator)
            pixels, micro = self.transform.apply(image, generator)
            # stream_position: rows of this process's stream read so far, less one (undecodable rows
            # included), where a stream cache resumes (``ldm.data.disk_cache.build_stream_cache``)
            yield {"pixel_values": pixels, "caption": caption, **micro, "stream_position": position}
