"""Caches that take the frozen parts out of the training step.

- Latent cache: the frozen autoencoder encodes the finite dataset once; each item keeps
  its posterior mean and std, so that z = mean + std * eps is still sampled every step.
  In memory, or in a safetensors file under ``cache_dir`` keyed by a fingerprint of the
  autoencoder and the data.
- Caption caches: each distinct caption is tokenized once, and, when the text encoder is
  frozen, encoded once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldm.data.batches import item_batches
from ldm.data.transforms import split_key

logger = logging.getLogger("ldm")


class LatentDataset(Dataset):
    """Cached posteriors: item -> {"mean": (C, h, w), "std": (C, h, w), "caption": str}."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str]):
        if not (len(mean) == len(std) == len(captions)):
            raise ValueError(
                "latent cache: mean, std and captions differ in length; delete the cache file to rebuild it"
            )
        self.mean, self.std, self.captions = mean, std, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, _ = split_key(key, len(self))
        return {"mean": self.mean[index], "std": self.std[index], "caption": self.captions[index]}


@torch.no_grad()
def encode_dataset(
    vae: AutoencoderKL, dataset: Dataset, batch_size: int, desc: str = "caching latents"
) -> LatentDataset:
    """Encode every item once (no augmentation); posterior mean and std in float32."""
    device = next(vae.parameters()).device
    means, stds, captions = [], [], []
    total = -(-len(dataset) // batch_size)
    for items in tqdm(item_batches(dataset, len(dataset), batch_size), total=total, desc=desc, leave=False):
        x = torch.stack([it["pixel_values"] for it in items]).to(device, vae.dtype)  # (b, 3, H, W)
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean.float().cpu())  # (b, C, h, w)
        stds.append(posterior.std.float().cpu())
        captions.extend(it["caption"] for it in items)
    return LatentDataset(torch.cat(means), torch.cat(stds), captions)


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
    return h.hexdigest()[:16]


def cached_latents(
    vae: AutoencoderKL,
    dataset: Dataset,
    batch_size: int,
    cache_dir: str | Path | None,
    key: str,
    write: bool = True,
) -> LatentDataset:
    """The latent dataset from ``cache_dir/latents-<key>.safetensors`` if present, else encoded
    (and saved there when ``write``: one process writes, the others read what it wrote)."""
    path = Path(cache_dir) / f"latents-{key}.safetensors" if cache_dir else None
    if path is not None and path.exists():
        tensors = load_file(str(path))
        captions = json.loads(path.with_suffix(".json").read_text())
        logger.info("latent cache: loaded %d items from %s", len(captions), path)
        return LatentDataset(tensors["mean"], tensors["std"], captions)
    latents = encode_dataset(vae, dataset, batch_size)
    if path is not None and write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"mean": latents.mean.contiguous(), "std": latents.std.contiguous()}, str(tmp))
        captions_tmp = path.with_name(f".{path.stem}.json.tmp")
        captions_tmp.write_text(json.dumps(latents.captions))
        os.replace(
            captions_tmp, path.with_suffix(".json")
        )  # captions first: the weights file marks completion
        os.replace(tmp, path)
        logger.info("latent cache: saved %d items to %s", len(latents), path)
    return latents


class CaptionCache:
    """caption -> tensor of ``fn``, computed once per distinct caption (at most ``max_items`` kept).

    Used for the token ids of every caption, and for the context (L, D) of a frozen text encoder.
    """

    def __init__(self, fn, max_items: int = 4096):
        self._fn = fn  # list[str] -> (B, ...)
        self._store: dict[str, torch.Tensor] = {}
        self.max_items = max_items

    def __call__(self, captions: list[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(c for c in captions if c not in self._store))
        fresh: dict[str, torch.Tensor] = {}
        if todo:
            with torch.no_grad():
                fresh = dict(zip(todo, self._fn(todo), strict=True))
            if len(self._store) + len(fresh) <= self.max_items:
                self._store.update(fresh)
        return torch.stack([self._store[c] if c in self._store else fresh[c] for c in captions])  # (B, ...)

    def __len__(self) -> int:
        return len(self._store)


def sample_latents(batch: dict[str, Any], vae: AutoencoderKL, device: torch.device) -> torch.Tensor:
    """z ~ q(z | x) for a batch: from the cached posterior (mean + std * eps) or by encoding the images.

    Both draw eps from the global RNG the same way, so for a fixed seed they give the same z.
    """
    if "mean" in batch:
        mean, std = batch["mean"].to(device), batch["std"].to(device)  # (B, C, h, w)
        return mean + std * torch.randn_like(mean)
    with torch.no_grad():
        x = batch["pixel_values"].to(device, vae.dtype)  # (B, 3, H, W)
        return vae.encode(x).latent_dist.sample().float()
