"""The denoising objective on one batch of latents (Ho et al. 2020; Rombach et al. 2022, eq. 2).

    t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,
    loss = mean_b w_b * || UNet(z_t, t, context) - target ||^2
with target eps, v or z_0 and w the min-SNR-gamma weight (1 when off).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from ldm.diffusion.config import NoiseConfig
from ldm.diffusion.noise import add_noise, min_snr_weight, sample_noise, snr, target
from ldm.training.randomness import StepRandom


def denoising_loss(
    unet: UNet2DConditionModel,
    z0: Tensor,
    context: Tensor,
    alphas_cumprod: Tensor,
    cfg: NoiseConfig,
    rng: StepRandom | None = None,
) -> Tensor:
    """Loss for clean latents ``z0`` (B, C, h, w) under ``context`` (B, L, D); draws t and eps from
    ``rng`` (the training loop's ``StepRandom``) or else the global RNG."""
    b = z0.shape[0]
    if rng is not None:
        t = rng.randint(cfg.num_train_timesteps, b).to(z0.device)  # (B,)
    else:
        t = torch.randint(0, cfg.num_train_timesteps, (b,), device=z0.device)  # (B,)
    eps = sample_noise(z0, cfg.offset_noise, rng)  # (B, C, h, w)
    z_t = add_noise(z0, eps, t, alphas_cumprod)
    pred = unet(z_t, t, encoder_hidden_states=context).sample  # (B, C, h, w)
    per_sample = (pred.float() - target(cfg.prediction_type, z0, eps, t, alphas_cumprod).float()).square()
    per_sample = per_sample.flatten(1).mean(1)  # (B,)
    if cfg.min_snr_gamma > 0:
        per_sample = per_sample * min_snr_weight(
            cfg.prediction_type, snr(t, alphas_cumprod), cfg.min_snr_gamma
        )
    return per_sample.mean()
