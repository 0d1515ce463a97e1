"""Caches that take the frozen parts out of the training step.

- Latent cache: the frozen autoencoder encodes the finite dataset once; each item keeps
  its posterior mean and std, so that z = mean + std * eps is still sampled every step. A
  deterministic posterior (pixels: the identity autoencoder) keeps its std of zeros as one element
  broadcast to every item (``zero_std``), not a second copy of the data.
  In memory here; on disk, in shards keyed by ``fingerprint``, in ``ldm.data.disk_cache``.
- Caption caches: each distinct caption is tokenized once, and, when the text encoder is
  frozen, encoded once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from ldm.core.randomness import StepRandom
from ldm.data.batches import item_batches
from ldm.data.masks import latent_mask
from ldm.data.transforms import split_key

logger = logging.getLogger("ldm")


MICRO_KEYS = ("original_size", "crop_top_left")  # per item, int64 (2,): SDXL's micro-conditioning
CACHE_FORMAT = "2: posteriors, captions, original_size, crop_top_left"


class LatentDataset(Dataset):
    """Cached posteriors: item -> {"mean": (C, h, w), "std": (C, h, w), "caption": str,
    "original_size": (2,), "crop_top_left": (2,)} (the last two: what resize and crop did to the image).

    ``mean`` and ``std`` are stacked (N, C, h, w), or lists of (C, h_i, w_i) when aspect-ratio
    buckets give items of several shapes; ``bucket_of`` carries the buckets over to the sampler;
    ``micro`` maps each of ``MICRO_KEYS`` to (N, 2) int64.
    """

    def __init__(
        self,
        mean: torch.Tensor | list[torch.Tensor],
        std: torch.Tensor | list[torch.Tensor],
        captions: list[str],
        bucket_of: list[int] | None = None,
        micro: dict[str, torch.Tensor] | None = None,
    ):
        if not (len(mean) == len(std) == len(captions)) or any(
            len(v) != len(captions) for v in (micro or {}).values()
        ):
            raise ValueError(
                "latent cache: mean, std, captions and sizes differ in length; delete the cache file to rebuild it"
            )
        self.mean, self.std, self.captions, self.bucket_of = mean, std, captions, bucket_of
        self.micro = micro or {}

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, _ = split_key(key, len(self))
        item = {"mean": self.mean[index], "std": self.std[index], "caption": self.captions[index]}
        return item | {k: v[index] for k, v in self.micro.items()}


Posteriors = tuple[
    "torch.Tensor | list[torch.Tensor]",
    "torch.Tensor | list[torch.Tensor]",
    list[str],
    dict[str, torch.Tensor],
]


def zero_std(shape: tuple[int, ...]) -> torch.Tensor:
    """Zeros of ``shape`` held in one float32 element (stride 0): the std of a deterministic posterior."""
    return torch.zeros(()).expand(shape)


def is_zero_std(std: torch.Tensor) -> bool:
    """Whether ``std`` is a ``zero_std`` view (nothing stored per item)."""
    return std.dim() > 0 and std.numel() > 1 and all(s == 0 for s in std.stride())


def scale_std(std: torch.Tensor, scale: float) -> torch.Tensor:
    """``std * scale``; a ``zero_std`` stays the view it is (the product would store every zero)."""
    return std if is_zero_std(std) else std * scale


def item_micro(item: dict) -> list[list[int]]:
    """An item's ``MICRO_KEYS`` values as ints; (h, w) of its pixels and (0, 0) where the dataset gives none."""
    height, width = item["pixel_values"].shape[-2:]
    default = {"original_size": [height, width], "crop_top_left": [0, 0]}
    return [[int(v) for v in item.get(k, default[k])] for k in MICRO_KEYS]


@torch.no_grad()
def encode_items(
    vae: AutoencoderKL,
    dataset: Dataset,
    batch_size: int,
    desc: str = "caching latents",
    per_item: bool = False,
) -> Posteriors:
    """(means, stds, captions, micro) of every item, encoded once (no augmentation), float32 on the CPU;
    micro: each of ``MICRO_KEYS`` -> (N, 2) int64.

    Compact: ``means`` and ``stds`` are (N, C, h, w) tensors, allocated once and filled batch by
    batch; with ``per_item`` (aspect-ratio buckets: items of several shapes) lists of (C, h_i, w_i)
    tensors, each with storage of its own. Never views into a batch, which would keep (or, pickled
    for another process, copy) the whole batch. A deterministic posterior's stds are ``zero_std``.
    """
    device = vae.device
    n = len(dataset)
    means: torch.Tensor | list[torch.Tensor] | None = [] if per_item else None
    stds: torch.Tensor | list[torch.Tensor] | None = [] if per_item else None
    captions: list[str] = []
    # (N, 2) int64 each, filled in place: no per-item tensors kept (thousands of small allocations
    # between the batches' large ones fragment the heap)
    sizes = {k: torch.zeros((n, 2), dtype=torch.long) for k in MICRO_KEYS}
    for items in tqdm(
        item_batches(dataset, n, batch_size), total=-(-n // batch_size), desc=desc, leave=False
    ):
        groups: dict[tuple[int, ...], list[int]] = {}  # items of one shape encode together (buckets)
        for k, it in enumerate(items):
            groups.setdefault(tuple(it["pixel_values"].shape), []).append(k)
        if not per_item and len(groups) > 1:
            raise ValueError(
                f"latent cache: items of several shapes {sorted(groups)} without aspect-ratio buckets"
            )
        start = len(captions)
        item_mean: list[torch.Tensor | None] = [None] * len(items)
        item_std: list[torch.Tensor | None] = [None] * len(items)
        item_mask: list[torch.Tensor | None] = [None] * len(items)
        for ks in groups.values():
            x = torch.stack([items[k]["pixel_values"] for k in ks]).to(device, vae.dtype)  # (b, 3, H, W)
            posterior = vae.encode(x).latent_dist
            deterministic = bool(getattr(posterior, "deterministic", False))  # std = 0 (pixels)
            mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()  # (b, C, h, w)
            if per_item:
                if "mask" in items[0]:  # masked loss, buckets: each item's weights at its latents' size
                    masks = latent_mask(torch.stack([items[k]["mask"] for k in ks]), tuple(mean.shape[-2:]))
                for j, k in enumerate(ks):
                    item_mean[k] = mean[j].clone()
                    item_std[k] = zero_std(tuple(std.shape[1:])) if deterministic else std[j].clone()
                    if "mask" in items[0]:
                        item_mask[k] = masks[j].clone()  # (1, h_i, w_i)
                continue
            if means is None:
                means = mean.new_empty((n, *mean.shape[1:]))
                stds = zero_std((n, *std.shape[1:])) if deterministic else std.new_empty((n, *std.shape[1:]))
            means[start : start + len(ks)] = mean
            if not is_zero_std(stds):
                stds[start : start + len(ks)] = std
        if per_item:
            means += item_mean
            stds += item_std
        captions.extend(it["caption"] for it in items)
        for k, values in zip(MICRO_KEYS, zip(*(item_micro(it) for it in items), strict=True), strict=True):
            sizes[k][start : start + len(items)] = torch.tensor(values)  # (b, 2)
        if "mask" in items[0] and per_item:
            sizes.setdefault("mask", []).extend(item_mask)  # a list: the items' latents differ in size
        elif "mask" in items[0]:  # masked loss: each item's weights at the latents' size
            masks = latent_mask(torch.stack([it["mask"] for it in items]), tuple(means.shape[-2:]))
            if "mask" not in sizes:
                sizes["mask"] = masks.new_empty((n, *masks.shape[1:]))  # (N, 1, h, w)
            sizes["mask"][start : start + len(items)] = masks
    if means is None:  # no items
        return torch.empty(0), torch.empty(0), captions, sizes
    return means, stds, captions, sizes


def nbytes(latents: LatentDataset) -> int:
    """Bytes held by the cached posteriors (mean and std): their storage, so a ``zero_std`` counts 4 bytes."""
    tensors = [latents.mean, latents.std]
    if not isinstance(latents.mean, torch.Tensor):
        tensors = [*latents.mean, *latents.std]
    return sum(t.untyped_storage().nbytes() for t in tensors)


def encode_dataset(
    vae: AutoencoderKL, dataset: Dataset, batch_size: int, desc: str = "caching latents"
) -> LatentDataset:
    """Encode every item once (no augmentation); posterior mean and std in float32."""
    bucket_of = getattr(dataset, "bucket_of", None)
    mean, std, captions, micro = encode_items(vae, dataset, batch_size, desc, bucket_of is not None)
    return LatentDataset(mean, std, captions, bucket_of, micro)


GATHER_CHUNK_BYTES = 16 * 2**20  # rows of the cache cross between processes in pieces of about this size


def encode_sharded(
    vae: AutoencoderKL,
    dataset: Dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    gather_object,
    gather_tensor,
    device: torch.device | None = None,
) -> LatentDataset:
    """Every process encodes items rank, rank + N, ...; all of them then hold the whole cache in item order.

    Items of one shape travel as tensors, through ``gather_tensor`` (accelerate's ``gather``) in
    pieces of ``GATHER_CHUNK_BYTES`` written straight into the preallocated cache, so caching peaks
    at about the cache plus this process's shard. Aspect-ratio buckets (items of several shapes)
    travel as per-item tensors through ``gather_object``, which pickles them.
    """
    n = len(dataset)
    indices = list(range(rank, n, world_size))
    bucket_of = getattr(dataset, "bucket_of", None)
    desc = f"caching latents (shard {rank}/{world_size})"
    mean, std, captions, sizes = encode_items(
        vae, Subset(dataset, indices), batch_size, desc, bucket_of is not None
    )
    everyone = gather_object([(captions, sizes)])  # one (captions, sizes) per process, in rank order
    ordered = [everyone[i % world_size][0][i // world_size] for i in range(n)]

    def rows(k: str):  # item i from rank i % P; a bucketed cache's masks are a list of sizes
        column = [everyone[i % world_size][1][k][i // world_size] for i in range(n)]
        listed = any(isinstance(shard.get(k), list) for _, shard in everyone)
        return column if listed else torch.stack(column)

    micro = {  # MICRO_KEYS, and "mask" with masked loss (a process without items has no mask)
        k: rows(k) if n else sizes[k] for k in dict.fromkeys(k for _, shard in everyone for k in shard)
    }
    if bucket_of is None:
        # (shape, deterministic) from every process with items: all of them gather the same tensors
        shapes = [
            s for s in gather_object([(tuple(mean.shape[1:]), is_zero_std(std)) if len(mean) else None]) if s
        ]
        (shape, deterministic) = shapes[0]
        means = _gather_rows(mean, n, world_size, shape, gather_tensor, device)
        del mean
        stds = (
            zero_std((n, *shape))
            if deterministic
            else _gather_rows(std, n, world_size, shape, gather_tensor, device)
        )
        return LatentDataset(means, stds, ordered, bucket_of, micro)
    mean_list: list[torch.Tensor | None] = [None] * n
    std_list: list[torch.Tensor | None] = [None] * n
    for r, (m, sd) in enumerate(gather_object([(mean, std)])):  # per rank: lists of (C, h_i, w_i)
        mean_list[r::world_size], std_list[r::world_size] = m, sd
    return LatentDataset(mean_list, std_list, ordered, bucket_of, micro)


def _gather_rows(
    local: torch.Tensor, n: int, world_size: int, shape: tuple[int, ...], gather_tensor, device
) -> torch.Tensor:
    """(n, *shape) float32 on every process, from each process's rows (items rank, rank + N, ...).

    Each process pads its shard to ceil(n / N) rows; piece k of every shard is gathered at once
    (the same number of calls on every process) and scattered into place.
    """
    out = torch.empty((n, *shape), dtype=torch.float32)  # (N, C, h, w)
    per_rank = -(-n // world_size)
    row_bytes = max(1, math.prod(shape) * 4)
    rows = max(1, GATHER_CHUNK_BYTES // (row_bytes * world_size))
    for start in range(0, per_rank, rows):
        k = min(rows, per_rank - start)
        piece = torch.zeros((k, *shape), dtype=torch.float32)
        mine = local[start : start + k]
        if len(mine):  # (a process without items has an empty (0,) tensor)
            piece[: len(mine)] = mine
        got = gather_tensor(piece.to(device) if device is not None else piece).cpu()  # (N * k, ...)
        got = got.view(world_size, k, *shape)
        j = torch.arange(start, start + k)
        for r in range(world_size):
            where = r + world_size * j  # the dataset indices of rank r's rows
            valid = where < n
            out[where[valid]] = got[r][valid]
    return out


def fingerprint(vae_dir: str | Path, data_config: dict[str, Any], seed: int) -> str:
    """Key of a cache: the autoencoder's config and weights file, and the data that was encoded."""
    vae_dir = Path(vae_dir)
    h = hashlib.sha256()
    h.update(
        (vae_dir / "config.json").read_bytes()
        if (vae_dir / "config.json").exists()
        else str(vae_dir).encode()
    )
    for weights in sorted(vae_dir.glob("*.safetensors")):
        stat = weights.stat()
        h.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update(json.dumps(data_config, sort_keys=True).encode())
    h.update(str(seed).encode())
    h.update(CACHE_FORMAT.encode())  # a cache of an older format is rebuilt, not read without its keys
    return h.hexdigest()[:16]


def cached_latents(
    vae: AutoencoderKL,
    dataset: Dataset,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    gather_object=None,
    gather_tensor=None,
    device: torch.device | None = None,
) -> LatentDataset:
    """The latent dataset in memory, encoded now. With ``world_size`` > 1 (and both gathers), the
    processes encode one shard each and share them (``encode_sharded``): every process holds it all.
    For data bigger than memory, ``ldm.data.disk_cache`` keeps it on disk instead."""
    if world_size > 1:
        if gather_object is None or gather_tensor is None:
            raise ValueError("cached_latents on several processes needs gather_object and gather_tensor")
        return encode_sharded(
            vae, dataset, batch_size, rank, world_size, gather_object, gather_tensor, device
        )
    return encode_dataset(vae, dataset, batch_size)


def sample_latents(
    batch: dict[str, Any], vae: AutoencoderKL, device: torch.device, rng: StepRandom | None = None
) -> torch.Tensor:
    """z = mean + std * eps ~ q(z | x) for a batch, from the cached posterior or by encoding the images.

    Both draw eps the same way (from ``rng`` when given, else the global RNG), so for a fixed seed
    they give the same z.
    """
    if "mean" in batch:
        mean, std = batch["mean"].to(device), batch["std"].to(device)  # (B, C, h, w)
    else:
        with torch.no_grad():
            x = batch["pixel_values"].to(device, vae.dtype)  # (B, 3, H, W)
            posterior = vae.encode(x).latent_dist
            mean, std = posterior.mean.float(), posterior.std.float()
    eps = rng.randn(*mean.shape).to(mean) if rng is not None else torch.randn_like(mean)
    return mean + std * eps
