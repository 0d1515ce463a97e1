"""Classifier-free guidance and its rescale, on the UNet's two predictions."""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg


def guided_prediction(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = eps_u + s (eps_c - eps_u)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def rescale_guidance(guided: torch.Tensor, pred_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eqs. 15-16): match the per-sample std of the guided
    prediction to the conditional one, x_rescaled = x_cfg * std(x_c) / std(x_cfg), then blend
    phi * x_rescaled + (1 - phi) * x_cfg. Counters over-exposure at high guidance."""
    return rescale_noise_cfg(guided, pred_cond, guidance_rescale=phi)
