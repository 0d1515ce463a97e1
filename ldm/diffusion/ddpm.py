"""The DDPM objective: a discrete variance-preserving forward process and its three parameterisations.

z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps                  (Ho et al. 2020, eq. 4)
v   = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0                  (Salimans & Ho 2022, sec. 4)
SNR(t) = abar_t / (1 - abar_t)

diffusers' ``DDPMScheduler`` holds the schedule and does the noising (``add_noise``) and the v target
(``get_velocity``); the min-SNR weight uses ``diffusers.training_utils.compute_snr``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import Tensor

from ldm.core.randomness import StepRandom
from ldm.diffusion.config import PREDICTION_TYPES, NoiseConfig
from ldm.diffusion.objective import Objective

logger = logging.getLogger("ldm")


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


def _unknown(kind: str) -> ValueError:
    return ValueError(f"unknown prediction type {kind!r}; allowed: {' | '.join(PREDICTION_TYPES)}")


def ddpm_to_x0(kind: str, pred: Tensor, z_t: Tensor, abar: Tensor) -> Tensor:
    """z^_0 from the prediction (abar broadcast to z_t): eps -> (z_t - sqrt(1 - abar) eps) / sqrt(abar),
    v -> sqrt(abar) z_t - sqrt(1 - abar) v, z_0 itself."""
    if kind == "epsilon":
        return (z_t - (1 - abar).sqrt() * pred) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * z_t - (1 - abar).sqrt() * pred
    if kind == "sample":
        return pred
    raise _unknown(kind)


def ddpm_to_eps(kind: str, pred: Tensor, z_t: Tensor, abar: Tensor) -> Tensor:
    """eps^ from the prediction: eps itself, v -> sqrt(1 - abar) z_t + sqrt(abar) v,
    z_0 -> (z_t - sqrt(abar) z_0) / sqrt(1 - abar)."""
    if kind == "epsilon":
        return pred
    if kind == "v_prediction":
        return (1 - abar).sqrt() * z_t + abar.sqrt() * pred
    if kind == "sample":
        return (z_t - abar.sqrt() * pred) / (1 - abar).sqrt()
    raise _unknown(kind)


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
    raise _unknown(kind)


def debiased_weight(kind: str, snr_t: Tensor) -> Tensor:
    """Debiased-estimation loss weights (Yu et al. 2024), per prediction type, (B,): 1 / sqrt(SNR) on
    the eps error, 1 / (SNR + 1) on the v error, with SNR capped at 1000 (SNR(0) is near infinite), as
    kohya's ``--debiased_estimation_loss`` computes them."""
    snr_t = snr_t.clamp(max=1000.0)
    if kind == "epsilon":
        return snr_t.clamp_min(1e-12).rsqrt()
    if kind == "v_prediction":
        return 1 / (snr_t + 1)
    raise ValueError(f"debiased estimation weights epsilon or v_prediction losses, not {kind!r}")


def timestep_bounds(num_train_timesteps: int, timestep_range: list[float] | None) -> tuple[int, int]:
    """[lo, hi) of the integer timesteps a ``noise.timestep_range`` of fractions covers (at least one)."""
    if timestep_range is None:
        return 0, num_train_timesteps
    lo = min(int(timestep_range[0] * num_train_timesteps), num_train_timesteps - 1)
    return lo, max(lo + 1, min(num_train_timesteps, round(timestep_range[1] * num_train_timesteps)))


class DDPM(Objective):
    """Prediction epsilon / v / sample on a DDPM schedule, with min-SNR-gamma, offset noise and
    zero-terminal-SNR as ``NoiseConfig`` sets them."""

    name = "ddpm"
    default_sampler = "ddim"

    def __init__(
        self,
        scheduler: DDPMScheduler,
        min_snr_gamma: float = 0.0,
        offset_noise: float = 0.0,
        debiased: bool = False,
        timestep_range: list[float] | None = None,
    ):
        self.scheduler = scheduler
        self.debiased = debiased
        self.prediction_type: str = scheduler.config.prediction_type
        self.num_train_timesteps: int = scheduler.config.num_train_timesteps
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        if self.prediction_type not in PREDICTION_TYPES:
            raise _unknown(self.prediction_type)
        self.t_low, self.t_high = timestep_bounds(self.num_train_timesteps, timestep_range)
        if debiased:
            worst = float(
                debiased_weight(
                    self.prediction_type, compute_snr(self.scheduler, torch.arange(self.num_train_timesteps))
                ).max()
            )
            if worst > 100:
                logger.warning(
                    "noise.debiased_estimation on this schedule weights the noisiest steps up to %.0fx "
                    "(its SNR nears 0; SD's scaled_linear peaks at about 640x): such steps can dominate a "
                    "batch's gradient; consider noise.timestep_range or min_snr_gamma", worst,
                )  # fmt: skip

    @classmethod
    def from_config(cls, cfg: NoiseConfig) -> DDPM:
        return cls(
            training_scheduler(cfg),
            cfg.min_snr_gamma,
            cfg.offset_noise,
            cfg.debiased_estimation,
            cfg.timestep_range,
        )

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> DDPM:
        """The objective of a DDPM-family scheduler config (ours, or any Stable Diffusion folder's)."""
        keys = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        return cls(DDPMScheduler.from_config(keys))

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.scheduler.alphas_cumprod  # (T,) float32

    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        return self.alphas_cumprod.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, rng: StepRandom | None, device: torch.device) -> Tensor:
        """t ~ U{lo..hi-1}: U{0..T-1} unless ``noise.timestep_range`` narrows it."""
        width = self.t_high - self.t_low
        if rng is not None:
            t = rng.randint(width, batch).to(device)
        else:
            t = torch.randint(0, width, (batch,), device=device)
        return t + self.t_low if self.t_low else t

    def noised(self, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.add_noise(z0, eps, t)

    def target(self, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(z0, eps, t)
        return z0

    def model_timestep(self, t: Tensor) -> Tensor:
        return t

    def loss_weight(self, t: Tensor) -> Tensor | None:
        """min-SNR-gamma's weight, debiased estimation's, their product, or None (neither)."""
        if self.min_snr_gamma <= 0 and not self.debiased:
            return None
        snr = compute_snr(self.scheduler, t)
        weight = (
            min_snr_weight(self.prediction_type, snr, self.min_snr_gamma) if self.min_snr_gamma > 0 else 1.0
        )
        if self.debiased:
            weight = weight * debiased_weight(self.prediction_type, snr)
        return weight

    def to_x0(self, pred: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        return ddpm_to_x0(self.prediction_type, pred, z_t, self._abar(t, z_t))

    def to_eps(self, pred: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        return ddpm_to_eps(self.prediction_type, pred, z_t, self._abar(t, z_t))

    def scheduler_config(self) -> dict[str, Any]:
        return {"_class_name": type(self.scheduler).__name__, **self.scheduler.config}

    def timestep_grid(self, points: int) -> Tensor:
        return torch.linspace(0, self.num_train_timesteps - 1, points).round().long()

    def time_at(self, u: Tensor) -> Tensor:
        return (u * self.num_train_timesteps).floor().long().clamp(0, self.num_train_timesteps - 1)
