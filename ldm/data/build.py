"""``build_dataset``: the train or validation dataset a ``DataConfig`` describes.

- ``shapes``: the built-in dataset; train and val are separate streams of items.
- ``folder``, ``csv`` and ``hf``: a seeded permutation of the items holds out
  ``min(data.val_size, max(1, n // 10))`` of them for validation (the same ones for the
  same seed), unless ``hf`` names a ``data.val_split``. Streamed ``hf`` datasets hold out
  the first ``data.val_size`` items of the stream (or of ``data.val_split``), loaded
  into memory.

Train items use ``data.crop`` and ``data.flip``, ``data.repeats`` and, with ``data.buckets``,
aspect-ratio buckets; validation items are square, center-cropped and never flipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import datasets
import numpy as np
from torch.utils.data import Dataset, IterableDataset

from ldm.core.config import DataConfig, SourceConfig
from ldm.core.errors import DataError
from ldm.data.buckets import make_buckets, nearest_bucket
from ldm.data.concepts import Concatenated, SourceView, paired_positions, source_positions
from ldm.data.folder import (
    IMAGE_EXTENSIONS,
    FolderItem,
    ImageFolderDataset,
    image_files,
    scan_csv,
    scan_folder,
)
from ldm.data.hf import HFImageDataset, HFStreamingDataset, load_hf_dataset
from ldm.data.masks import check_mask_sizes
from ldm.data.repeat import RepeatedDataset
from ldm.data.shapes import ShapesDataset

SPLITS = ("train", "val")
logger = logging.getLogger("ldm")


def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices of ``n`` items, each sorted: val is the first
    ``min(val_size, max(1, n // 10))`` of a permutation seeded by ``seed``."""
    n_val = min(val_size, max(1, n // 10))
    if n - n_val < 1:
        raise DataError(
            f"only {n} item(s): too few to hold {n_val} out for validation; add data or set data.val_size=0"
        )
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _build_hf_stream(
    cfg: DataConfig, train: bool, crop: str, flip: bool, seed: int
) -> Dataset | IterableDataset:
    stream = load_hf_dataset(
        cfg.path, cfg.val_split if cfg.val_split and not train else cfg.split, streaming=True
    )
    if train:
        if not cfg.val_split:
            stream = stream.skip(cfg.val_size)  # those are the validation items
        return HFStreamingDataset(
            stream,
            cfg.resolution,
            crop,
            flip,
            cfg.image_column,
            cfg.caption_column,
            seed=seed,
            shuffle_buffer=cfg.shuffle_buffer,
        )
    rows = list(stream.take(cfg.val_size))
    held = (
        datasets.Dataset.from_list(rows, features=stream.features)
        if rows
        else datasets.Dataset.from_dict({cfg.image_column: [], cfg.caption_column: []})
    )
    return HFImageDataset(held, cfg.resolution, crop, flip, cfg.image_column, cfg.caption_column)


def build_dataset(
    cfg: DataConfig, split: str, seed: int, bucket_step: int | None = None
) -> Dataset | IterableDataset:
    """The ``split`` ("train" or "val") of the data ``cfg`` describes.

    Map-style datasets take ``dataset[i]`` or ``dataset[(i, aug_seed)]`` and return
    ``{"pixel_values": float32 (3, R, R) in [-1, 1], "caption": str}``; a streamed ``hf``
    train split is an ``IterableDataset`` yielding the same dicts. Call it with the same
    ``seed`` for both splits so that they stay disjoint. With ``data.buckets`` the train split's
    items are (3, h, w) of their bucket, listed in ``dataset.bucket_of``; ``bucket_step`` (pixels,
    the latent factor times 8) sets the bucket sides.
    """
    if split not in SPLITS:
        raise ValueError(f"split is {split!r}; allowed: {' | '.join(SPLITS)}")
    train = split == "train"
    dataset = _build(cfg, train, seed)
    if train and cfg.buckets:
        if bucket_step is None:
            raise ValueError("data.buckets=true: build_dataset needs bucket_step (the latent factor times 8)")
        if isinstance(dataset, SourceView):  # each source's images get their buckets, then the view
            for part in dataset.base.parts:
                assign_buckets(part, cfg.resolution, bucket_step, cfg.bucket_max_aspect)
            dataset = SourceView(
                Concatenated(dataset.base.parts), dataset.items, dataset.sources, dataset.group
            )
        else:
            assign_buckets(dataset, cfg.resolution, bucket_step, cfg.bucket_max_aspect)
    if train and cfg.repeats > 1:
        dataset = RepeatedDataset(dataset, cfg.repeats)
    return dataset


def assign_buckets(dataset: Dataset, resolution: int, step: int, max_aspect: float) -> None:
    """Give each item the bucket nearest its aspect ratio: sets ``target_sizes`` and ``bucket_of``."""
    buckets = make_buckets(resolution, step, max_aspect)
    dataset.bucket_of = [nearest_bucket(buckets, w, h) for w, h in dataset.image_sizes()]
    dataset.target_sizes = [buckets[b] for b in dataset.bucket_of]
    counts = {buckets[b]: dataset.bucket_of.count(b) for b in sorted(set(dataset.bucket_of))}
    logger.info(
        "aspect-ratio buckets (w x h: images): %s", ", ".join(f"{w}x{h}: {n}" for (w, h), n in counts.items())
    )


def _shapes(cfg: DataConfig, train: bool, seed: int, crop: str, flip: bool) -> Dataset:
    size = cfg.train_size if train else cfg.val_size
    return ShapesDataset(
        size, cfg.resolution, seed, "train" if train else "val", holdout=cfg.holdout, flip=flip,
        crop_margin=cfg.crop_margin if train else 0,
    )  # fmt: skip


def _listed(cfg: DataConfig, train: bool, seed: int, crop: str, flip: bool) -> Dataset:
    """An image folder with ``metadata.jsonl`` / captions (``folder``), or a CSV of paths and captions."""
    if cfg.dataset == "folder":
        items = scan_folder(cfg.path, cfg.caption_column)
    else:
        items = scan_csv(cfg.path, cfg.image_column, cfg.caption_column)
    train_idx, val_idx = split_indices(len(items), cfg.val_size, seed)
    chosen = [items[i] for i in (train_idx if train else val_idx)]
    masks = cfg.masked_loss and train  # (validation measures the plain loss)
    if masks:  # a mask of the wrong size stops the run here, before anything trains
        check_mask_sizes([(it.path, it.size) for it in chosen], IMAGE_EXTENSIONS)
    return ImageFolderDataset(cfg.path, cfg.resolution, crop, flip, items=chosen, masks=masks)


def _hf(cfg: DataConfig, train: bool, seed: int, crop: str, flip: bool) -> Dataset | IterableDataset:
    if cfg.streaming:
        return _build_hf_stream(cfg, train, crop, flip, seed)
    if cfg.val_split and not train:
        data = load_hf_dataset(cfg.path, cfg.val_split)
        order = np.random.default_rng(seed).permutation(len(data))
        data = data.select(sorted(order[: cfg.val_size].tolist()))
    else:
        data = load_hf_dataset(cfg.path, cfg.split)
        if not cfg.val_split:
            train_idx, val_idx = split_indices(len(data), cfg.val_size, seed)
            data = data.select(train_idx if train else val_idx)
    return HFImageDataset(data, cfg.resolution, crop, flip, cfg.image_column, cfg.caption_column)


def _source_items(source: SourceConfig) -> list[FolderItem]:
    """A source's images with their captions; a regularization source's images without one get its
    ``class_prompt`` (or its first ``class_prompts``)."""
    if source.role == "regularization" and not image_files(source.path):
        raise DataError(
            f"the regularization source {source.path} holds no class images: set its num_class_images=N "
            "to have the base model draw N there, or point its path at a folder of class images"
        )
    if source.dataset == "csv":
        return scan_csv(source.path, source.image_column, source.caption_column)
    empty = source.prompts()[0] if source.role == "regularization" else None
    return scan_folder(source.path, source.caption_column, empty)


def _with_words(items: list[FolderItem], source: SourceConfig) -> list[FolderItem]:
    """Held-out items with their source's prefix and suffix, as training sees them."""
    words = lambda c: " ".join(p for p in (source.prefix, c, source.suffix) if p)  # noqa: E731
    return [it._replace(caption=words(it.caption)) for it in items]


def _concepts(cfg: DataConfig, train: bool, seed: int, crop: str, flip: bool) -> Dataset:
    """``data.sources`` as one dataset: train split, a ``SourceView`` (``ldm.data.concepts``); validation,
    the held-out items of the train sources (regularization sources are never held out)."""
    parts, sizes, held = [], [], []
    for source in cfg.sources:
        if not train and source.role != "train":
            continue  # (regularization sources are never held out)
        items = _source_items(source)
        if source.role == "train":
            try:
                train_idx, val_idx = split_indices(len(items), cfg.val_size, seed)
            except DataError as err:
                raise DataError(f"data source {source.path}: {err}") from None
            if val_idx and train:
                logger.info(
                    "data source %s: %d of its %d images held out for validation (data.val_size=0 trains on all)",
                    source.path, len(val_idx), len(items),
                )  # fmt: skip
        else:
            train_idx, val_idx = list(range(len(items))), []
        if not train:
            held.extend(_with_words([items[i] for i in val_idx], source))
            continue
        chosen = [items[i] for i in train_idx]
        if cfg.masked_loss:
            check_mask_sizes([(it.path, it.size) for it in chosen], IMAGE_EXTENSIONS)
        parts.append(
            ImageFolderDataset(source.path, cfg.resolution, crop, flip, items=chosen, masks=cfg.masked_loss)
        )
        sizes.append(len(chosen))
    if not train:
        return ImageFolderDataset(cfg.sources[0].path, cfg.resolution, crop, flip, items=held)
    items, sources = source_positions(sizes, [s.repeats for s in cfg.sources])
    roles = np.array([s.role == "regularization" for s in cfg.sources])
    group = 1
    if roles.any():  # DreamBooth: instance and class positions in pairs
        prior = roles[sources]
        items, sources = paired_positions((items[~prior], sources[~prior]), (items[prior], sources[prior]))
        group = 2
    return SourceView(Concatenated(parts), items, sources, group)


# the data sources by name (``data.dataset``): (config, train split?, seed, crop, flip) -> dataset
DATA_SOURCES: dict[str, Callable[..., Dataset | IterableDataset]] = {
    "shapes": _shapes,
    "folder": _listed,
    "csv": _listed,
    "hf": _hf,
    "sources": _concepts,
}


def _build(cfg: DataConfig, train: bool, seed: int) -> Dataset | IterableDataset:
    crop, flip = (cfg.crop, cfg.flip) if train else ("center", False)
    if cfg.dataset not in DATA_SOURCES:
        raise ValueError(f"data.dataset is {cfg.dataset!r}; allowed: {' | '.join(DATA_SOURCES)}")
    return DATA_SOURCES[cfg.dataset](cfg, train, seed, crop, flip)
