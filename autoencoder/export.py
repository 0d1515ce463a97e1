"""Exporting the trained autoencoder: measure its latent scale, save a diffusers folder."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.data import Dataset

from ldm.core.io import replace_dir, umask_permissions
from ldm.data.batches import image_batches

logger = logging.getLogger("ldm")


@torch.no_grad()
def latent_std(
    vae: AutoencoderKL, dataset: Dataset, num_samples: int, batch_size: int, seed: int = 0
) -> float:
    """std of z ~ q(z|x) over all latent elements of the first ``num_samples`` items (no augmentation)."""
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    n = min(num_samples, len(dataset))
    zs = []
    for x in image_batches(dataset, n, batch_size):
        posterior = vae.encode(x.to(device)).latent_dist
        zs.append(posterior.sample(generator=generator).float().cpu())  # (b, C, h, w)
    return torch.cat(zs).std().item()


def measure_scaling_factor(vae: AutoencoderKL, dataset: Dataset, num_samples: int, batch_size: int) -> float:
    """``scaling_factor = 1 / std(z)`` (Rombach et al. 2022, sec. 4.3.2 / appendix G), so that the
    diffusion model sees latents of unit variance."""
    return 1.0 / latent_std(vae, dataset, num_samples, batch_size)


def export_autoencoder(vae: AutoencoderKL, folder: Path, scaling_factor: float) -> Path:
    """Save ``vae`` as a diffusers ``AutoencoderKL`` folder (config.json + safetensors), atomically."""
    folder = Path(folder)
    vae.register_to_config(scaling_factor=float(scaling_factor))
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    umask_permissions(tmp)  # safetensors writes 0600
    replace_dir(tmp, folder)
    logger.info("exported AutoencoderKL to %s (scaling_factor %.5f)", folder, scaling_factor)
    return folder
