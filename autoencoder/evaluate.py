"""Evaluating an autoencoder on the validation split: PSNR, SSIM, latent statistics (and rFID)."""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKL
from torch.utils.data import Dataset

from autoencoder.config import VAEEvalConfig
from ldm.data.batches import image_batches
from ldm.quality import psnr, ssim

logger = logging.getLogger("ldm")


@torch.no_grad()
def evaluate_autoencoder(
    vae: AutoencoderKL,
    dataset: Dataset,
    cfg: VAEEvalConfig,
    batch_size: int = 128,
    allow_pickle: bool = False,
) -> dict:
    """Reconstruct through the posterior mean; mean PSNR (dB) and SSIM over ``cfg.num_samples`` items."""
    device = next(vae.parameters()).device
    n = min(cfg.num_samples, len(dataset))
    psnrs, ssims, means, stds, originals, recs = [], [], [], [], [], []
    for x in image_batches(dataset, n, batch_size):
        x = x.to(device)  # (b, 3, H, W)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.mode()).sample.clamp(-1, 1)
        psnrs.append(psnr(x, rec).cpu())
        ssims.append(ssim(x, rec).cpu())
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        if cfg.inception_weights is not None:
            originals.append(x.cpu())
            recs.append(rec.cpu())
    mean = torch.cat(means)
    results = {
        "num_samples": n,
        "psnr": torch.cat(psnrs).mean().item(),
        "ssim": torch.cat(ssims).mean().item(),
        "latent_mean": mean.mean().item(),
        "latent_std": mean.std().item(),
        "posterior_std": torch.cat(stds).mean().item(),
    }
    if cfg.inception_weights is None:
        logger.info("rFID skipped: no Inception weights (set eval.inception_weights=PATH to a local file)")
    else:
        from ldm.fid import frechet_distance_from_images

        results["rfid"] = frechet_distance_from_images(
            torch.cat(originals), torch.cat(recs), cfg.inception_weights, allow_pickle
        )
    return results
