"""Evaluating an autoencoder on the validation split: PSNR, SSIM, latent statistics, and LPIPS and
rFID when their weights are present (each missing one is named in ``skipped``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.data import Dataset

from autoencoder.config import VAEEvalConfig
from ldm.core.images import save_grid
from ldm.data.batches import image_batches
from ldm.eval.quality import psnr, ssim

logger = logging.getLogger("ldm")
LPIPS_SKIPPED = (
    "LPIPS skipped: needs the lpips package (pip install 'ldm[lpips]') and VGG16 weights "
    "(loss.lpips_weights=PATH, or vgg16-397923af.pth in torch's hub cache)"
)
RFID_SKIPPED = "rFID skipped: no Inception weights (set eval.inception_weights=PATH to a local file)"


@torch.no_grad()
def evaluate_autoencoder(
    vae: AutoencoderKL,
    dataset: Dataset,
    cfg: VAEEvalConfig,
    batch_size: int = 128,
    allow_pickle: bool = False,
    lpips: torch.nn.Module | None = None,
) -> dict:
    """Reconstruct through the posterior mean; mean PSNR (dB), SSIM (and LPIPS with an ``lpips``
    module) over ``cfg.num_samples`` items, latent statistics, rFID with ``cfg.inception_weights``."""
    device = next(vae.parameters()).device
    n = min(cfg.num_samples, len(dataset))
    psnrs, ssims, lpipss, means, stds, originals, recs = [], [], [], [], [], [], []
    for x in image_batches(dataset, n, batch_size):
        x = x.to(device)  # (b, 3, H, W)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.mode()).sample.clamp(-1, 1)
        psnrs.append(psnr(x, rec).cpu())
        ssims.append(ssim(x, rec).cpu())
        if lpips is not None:
            lpipss.append(lpips(x, rec).float().cpu())
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
        "skipped": [],
    }
    if lpips is not None:
        results["lpips"] = torch.cat(lpipss).mean().item()
    else:
        results["skipped"].append(LPIPS_SKIPPED)
    if cfg.inception_weights is None:
        results["skipped"].append(RFID_SKIPPED)
    else:
        from ldm.eval.fid import frechet_distance_from_images

        results["rfid"] = frechet_distance_from_images(
            torch.cat(originals), torch.cat(recs), cfg.inception_weights, allow_pickle
        )
    for message in results["skipped"]:
        logger.info(message)
    return results


@torch.no_grad()
def save_reconstructions(vae: AutoencoderKL, images: torch.Tensor, path: Path) -> None:
    """A grid: originals (top row) and their reconstructions from the posterior mean (bottom row)."""
    was_training = vae.training
    vae.eval()
    x = images.to(next(vae.parameters()).device)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    save_grid(torch.cat([x, rec]).cpu(), path, nrow=len(images))
    vae.train(was_training)
