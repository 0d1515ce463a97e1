"""Stage 2's training data: the latent cache built once across processes, and the captions' tokens."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather, gather_object
from diffusers import AutoencoderKL
from torch.utils.data import Dataset, IterableDataset

from conditioning import Conditioner
from conditioning.dropout import NULL_CAPTION
from ldm.data.cache import cached_latents, fingerprint, nbytes
from ldm.data.concepts import SourceView
from ldm.data.disk_cache import FORMAT as DISK_FORMAT
from ldm.data.disk_cache import DiskLatentDataset, build_disk_cache, build_stream_cache, shard_items
from ldm.data.repeat import RepeatedDataset
from ldm.data.text_disk_cache import FORMAT as TEXT_FORMAT
from ldm.data.text_disk_cache import PREFIX as TEXT_PREFIX
from ldm.data.text_disk_cache import DiskTextColumns, build_text_cache
from ldm.models.autoencoder import downsampling_factor
from ldm.train.config import LDMRunConfig
from ldm.training.memory import MIB, peak_resident_bytes, resident_bytes

logger = logging.getLogger("ldm")
CACHE_BATCH = 256  # images per encoder call while caching
# data keys that do not change what the cache holds (masked_loss does: keyed when on, below)
NOT_IN_CACHE = ("num_workers", "repeats", "masked_loss", "prior_loss_weight")
SOURCE_NOT_IN_CACHE = ("repeats", "caption_dropout", "prefix", "suffix")  # per source, likewise


def latent_training_set(
    cfg: LDMRunConfig, accelerator: Accelerator, vae: AutoencoderKL, vae_dir: Path, images: Dataset
) -> Dataset:
    """The posteriors of ``images`` (each distinct image encoded once; repeats kept as repeats). With
    ``cache_dir``, on disk (``ldm.data.disk_cache``: every process writes its shards, then reads its
    items from them); else in memory (each process encodes a shard and all gather them)."""
    t0, rss_before = time.perf_counter(), resident_bytes()
    view = images if isinstance(images, (RepeatedDataset, SourceView)) else None  # positions over items
    distinct = images.base if view is not None else images
    if hasattr(distinct, "keep_rendered"):  # shapes: one pass in order, no rendered copy to keep
        distinct.keep_rendered = False
    if isinstance(images, IterableDataset):  # a stream (with cache_dir, see LDMRunConfig): shard by shard
        folder = main_process_value(
            accelerator, disk_cache_folder(cfg, vae, vae_dir, accelerator.num_processes)
        )
        build_stream_cache(
            vae, images, CACHE_BATCH, folder, folder.name, shards_of(cfg, vae),
            accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
        )  # fmt: skip
        latents = DiskLatentDataset(folder)
        held, where = latents.nbytes(), f"on disk at {folder} (from the stream)"
    elif cfg.cache_dir:  # on disk: each process writes its shards and reads only its rows
        folder = main_process_value(accelerator, disk_cache_folder(cfg, vae, vae_dir))
        build_disk_cache(
            vae, distinct, CACHE_BATCH, folder, folder.name, shards_of(cfg, vae),
            accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
        )  # fmt: skip
        latents = DiskLatentDataset(folder, getattr(distinct, "bucket_of", None))
        held, where = latents.nbytes(), f"on disk at {folder}"
    else:
        latents = cached_latents(
            vae, distinct, CACHE_BATCH, rank=accelerator.process_index, world_size=accelerator.num_processes,
            gather_object=gather_object, gather_tensor=gather, device=accelerator.device,
        )  # fmt: skip
        held, where = nbytes(latents), "in memory"
    peak = peak_resident_bytes()
    logger.info(
        "latent cache: %d items, %.1f MiB %s, in %.1f s; resident memory %.0f MiB before, peak %s",
        len(latents), held / MIB, where, time.perf_counter() - t0, rss_before / MIB,
        f"{peak / MIB:.0f} MiB" if peak else "not reported by this OS",
    )  # fmt: skip
    return view.over(latents) if view is not None else latents


def distinct_items(dataset: Dataset) -> Dataset:
    """The dataset of distinct items under ``data.repeats`` or a concept dataset's positions."""
    return dataset.base if isinstance(dataset, (RepeatedDataset, SourceView)) else dataset


def main_process_value(accelerator: Accelerator, value):
    """The main process's ``value`` on every process (a cache folder's key: machines' copies of the
    autoencoder may differ in modification time)."""
    box = [value]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


def disk_cache_folder(
    cfg: LDMRunConfig, vae: AutoencoderKL, vae_dir: Path, stream_processes: int = 0
) -> Path:
    """``cache_dir/latents-<key>-<items per shard>``: keyed by the autoencoder, the data config and the
    seed, and the shards' size (a rerun continues a partial cache only with the same shards); a
    stream's also by the process count (each process caches its part of the stream)."""
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in NOT_IN_CACHE}
    data["sources"] = [{k: v for k, v in s.items() if k not in SOURCE_NOT_IN_CACHE} for s in data["sources"]]
    if not data["sources"]:
        del data["sources"]  # (a cache of one data.path keeps the key it had before data.sources)
    if cfg.data.masked_loss:  # a cache with masks (the key of every cache without them unchanged)
        data["masked_loss"] = True
    extra = {"stream_processes": stream_processes} if stream_processes else {}
    key = fingerprint(vae_dir, {**data, "disk_format": DISK_FORMAT, **extra}, cfg.seed)
    return Path(cfg.cache_dir) / f"latents-{key}-{shards_of(cfg, vae)}"


def shards_of(cfg: LDMRunConfig, vae: AutoencoderKL) -> int:
    """Items per shard: ``cache_shard_items``, else about 256 MB of posteriors."""
    return cfg.cache_shard_items or shard_items(posterior_bytes(cfg, vae))


def posterior_bytes(cfg: LDMRunConfig, vae: AutoencoderKL) -> int:
    """About the bytes of one item's cached posterior (mean and std, float32): what sizes the shards."""
    side = cfg.data.resolution // downsampling_factor(vae)
    return 2 * vae.config.latent_channels * side * side * 4


def caption_tokens(conditioner: Conditioner, train_set: Dataset, seen: set[int]) -> set[int]:
    """Token ids of the training captions: every caption of a finite dataset (so that a resumed run
    records those before the resume too), plus the ids ``seen`` in this run's batches."""
    base = distinct_items(train_set)
    distinct = list(dict.fromkeys(getattr(base, "captions", None) or []))
    ids = set(seen)
    for start in range(0, len(distinct), 1024):
        ids.update(conditioner.tokenize(distinct[start : start + 1024])[0].unique().tolist())
    return ids


def text_training_set(
    cfg: LDMRunConfig, accelerator: Accelerator, conditioner: Conditioner, latents: Dataset
) -> bool:
    """With ``cache_dir`` and frozen text encoders, every item's conditioning on disk too
    (``ldm.data.text_disk_cache``), read with its latents; returns whether it is. Call it once the
    encoders are in the dtype they train in (``cast_frozen``): the rows are what they compute."""
    base = distinct_items(latents)
    if not cfg.cache_dir or conditioner.trainable or not isinstance(base, DiskLatentDataset):
        return False
    if cfg.caption.changes_captions or any(s.prefix or s.suffix for s in cfg.data.sources):
        # the rows would be of the captions before the controls
        logger.info("text cache: in memory (caption.* changes the captions every step)")
        return False
    t0 = time.perf_counter()
    sample = conditioner.encode([""])
    per_item = sum(v[0].numel() * v.element_size() for v in sample.values())
    key = text_fingerprint(conditioner, base.folder.name)
    folder = Path(cfg.cache_dir) / f"text-{key}-{shard_items(per_item)}"
    build_text_cache(
        conditioner.encode, base.captions, folder, key, shard_items(per_item),
        accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
    )  # fmt: skip
    base.text = DiskTextColumns(folder)
    logger.info(
        "text cache: %d items' conditioning, %.1f MiB on disk at %s, in %.1f s",
        len(base.text), base.text.nbytes() / MIB, folder, time.perf_counter() - t0,
    )  # fmt: skip
    return True


def text_fingerprint(conditioner: Conditioner, latents_key: str) -> str:
    """Key of a text cache: every frozen encoder's config, settings and weights (hashed: a second
    a gigabyte), their dtype, and the latent cache the captions come from (the data and seed)."""
    h = hashlib.sha256(f"{TEXT_FORMAT}:{latents_key}".encode())
    for e in conditioner.encoders:
        h.update(e.model.config.to_json_string().encode())
        h.update(f"{e.max_length}:{e.hidden_layer}:{len(e.tokenizer)}".encode())
        for name, tensor in e.model.state_dict().items():
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cached_conditions(batch: dict, unconditional: dict[str, torch.Tensor], device: torch.device):
    """``conditions`` (see ``Conditioner.batch_conditions``) from a batch's cached rows: each caption's
    row, and the unconditional row where condition dropout replaced a caption by ""."""

    def conditions(kept: list[str]) -> dict[str, torch.Tensor]:
        dropped = [
            k == NULL_CAPTION and c != NULL_CAPTION for k, c in zip(kept, batch["caption"], strict=True)
        ]
        cond = {
            k[len(TEXT_PREFIX) :]: v.to(device, non_blocking=True)
            for k, v in batch.items()
            if k.startswith(TEXT_PREFIX)
        }
        if any(dropped):
            rows = torch.tensor(dropped, device=device)
            cond = {
                k: torch.where(rows.view(-1, *[1] * (v.ndim - 1)), unconditional[k].to(v), v)
                for k, v in cond.items()
            }
        return cond

    return conditions
