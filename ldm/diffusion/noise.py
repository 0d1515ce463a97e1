"""The forward process and the denoising targets, as small pure functions.

z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps                  (Ho et al. 2020, eq. 4)
v   = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0                  (Salimans & Ho 2022, sec. 4)
SNR(t) = abar_t / (1 - abar_t)
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from ldm.diffusion.config import NoiseConfig
from ldm.training.randomness import StepRandom


def training_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    """The DDPM schedule the UNet is trained on. ``clip_sample`` is off: latents are not in [-1, 1]."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
        clip_sample=False,
        timestep_spacing="trailing" if cfg.zero_terminal_snr else "leading",
        steps_offset=1,  # Stable Diffusion's convention; diffusers' StableDiffusionPipeline enforces it
    )


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    return values.to(like.device)[t].float().view(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


def add_noise(z0: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps."""
    abar = _gather(alphas_cumprod, t, z0)
    return abar.sqrt() * z0 + (1 - abar).sqrt() * eps


def target(kind: str, z0: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """What the UNet regresses: eps, v = sqrt(abar) eps - sqrt(1 - abar) z_0, or z_0."""
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        abar = _gather(alphas_cumprod, t, z0)
        return abar.sqrt() * eps - (1 - abar).sqrt() * z0
    if kind == "sample":
        return z0
    raise ValueError(f"unknown prediction type {kind!r}; allowed: epsilon | v_prediction | sample")


def snr(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """SNR(t) = abar_t / (1 - abar_t), (B,)."""
    abar = alphas_cumprod.to(t.device)[t].float()
    return abar / (1 - abar)


def min_snr_weight(kind: str, snr_t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 9), per prediction type, (B,).

    The weight on the x_0 error is min(SNR, gamma); expressed on the predicted quantity it is
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for x_0.
    At SNR = 0 (zero terminal SNR) the eps weight is taken as 1.
    """
    clipped = snr_t.clamp(max=gamma)
    if kind == "epsilon":
        return torch.where(snr_t > 0, clipped / snr_t.clamp_min(1e-12), torch.ones_like(snr_t))
    if kind == "v_prediction":
        return clipped / (snr_t + 1)
    if kind == "sample":
        return clipped
    raise ValueError(f"unknown prediction type {kind!r}; allowed: epsilon | v_prediction | sample")


def sample_noise(z0: Tensor, offset: float, rng: StepRandom | None = None) -> Tensor:
    """eps ~ N(0, I), plus ``offset`` * N(0, 1) per (sample, channel) when offset noise is on (Guttenberg 2023).

    Drawn from ``rng`` when given (the same numbers whatever the process count), else the global RNG.
    """

    def randn(*shape: int) -> Tensor:
        if rng is not None:
            return rng.randn(*shape).to(z0)
        return torch.randn(shape, device=z0.device, dtype=z0.dtype)

    eps = randn(*z0.shape)
    if offset > 0:
        eps = eps + offset * randn(*z0.shape[:2])[:, :, None, None]
    return eps
