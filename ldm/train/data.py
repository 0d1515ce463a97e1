"""Stage 2's training data: the latent cache built once across processes, and the captions' tokens."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather, gather_object
from diffusers import AutoencoderKL
from torch.utils.data import Dataset

from conditioning import Conditioner
from ldm.data.cache import cached_latents, fingerprint, nbytes
from ldm.data.repeat import RepeatedDataset
from ldm.train.config import LDMRunConfig
from ldm.training.memory import MIB, peak_resident_bytes, resident_bytes

logger = logging.getLogger("ldm")
CACHE_BATCH = 256  # images per encoder call while caching


def latent_training_set(
    cfg: LDMRunConfig, accelerator: Accelerator, vae: AutoencoderKL, vae_dir: Path, images: Dataset
) -> Dataset:
    """The posteriors of ``images`` (each distinct image encoded once; repeats kept as repeats). Each
    process encodes a shard, all gather them, the main process writes the file (``cache_dir``)."""
    t0, rss_before = time.perf_counter(), resident_bytes()
    repeats = images.times if isinstance(images, RepeatedDataset) else 1
    distinct = images.base if repeats > 1 else images
    if hasattr(distinct, "keep_rendered"):  # shapes: one pass in order, no rendered copy to keep
        distinct.keep_rendered = False
    key = fingerprint(vae_dir, dataclasses.asdict(cfg.data), cfg.seed)
    latents = cached_latents(
        vae, distinct, CACHE_BATCH, cfg.cache_dir, key, write=accelerator.is_main_process,
        rank=accelerator.process_index, world_size=accelerator.num_processes, gather_object=gather_object,
        gather_tensor=gather, device=accelerator.device,
    )  # fmt: skip
    peak = peak_resident_bytes()
    logger.info(
        "latent cache: %d items, %.1f MiB, in %.1f s; resident memory %.0f MiB before, peak %s",
        len(latents), nbytes(latents) / MIB, time.perf_counter() - t0, rss_before / MIB,
        f"{peak / MIB:.0f} MiB" if peak else "not reported by this OS",
    )  # fmt: skip
    return RepeatedDataset(latents, repeats) if repeats > 1 else latents


def caption_tokens(conditioner: Conditioner, train_set: Dataset, seen: set[int]) -> set[int]:
    """Token ids of the training captions: every caption of a finite dataset (so that a resumed run
    records those before the resume too), plus the ids ``seen`` in this run's batches."""
    base = train_set.base if isinstance(train_set, RepeatedDataset) else train_set
    distinct = list(dict.fromkeys(getattr(base, "captions", None) or []))
    ids = set(seen)
    for start in range(0, len(distinct), 1024):
        ids.update(conditioner.tokenize(distinct[start : start + 1024])[0].unique().tolist())
    return ids
