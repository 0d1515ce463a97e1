"""Rectified flow (Liu et al. 2022), in the form of Stable Diffusion 3 (Esser et al. 2024).

    z_t = (1 - t) z_0 + t eps,  t in [0, 1]                       (straight path, eq. 1 of SD3)
    v   = dz_t / dt = eps - z_0                                    (the velocity the UNet regresses)
    z_0 = z_t - t v,   eps = z_t + (1 - t) v                       (the prediction algebra)

Timesteps: uniform, or logit-normal t = sigmoid(m + s n), n ~ N(0, 1) (Esser et al. 2024, eq. 19),
then the resolution shift t' = a t / (1 + (a - 1) t) with a = sqrt(m / n) for m pixels against a
base of n (eq. 23); diffusers' ``FlowMatchEulerDiscreteScheduler`` applies the same ``shift`` to its
sampling sigmas. The UNet sees 1000 t, as the scheduler feeds it (``timesteps = sigmas * T``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from ldm.core.randomness import StepRandom
from ldm.diffusion.config import TIMESTEP_SAMPLING, NoiseConfig
from ldm.diffusion.objective import Objective


def _view(t: Tensor, like: Tensor) -> Tensor:
    return t.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


def interpolate(z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """z_t = (1 - t) z_0 + t eps."""
    t = _view(t, z0)
    return (1 - t) * z0 + t * eps


def flow_to_x0(v: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
    """z_0 = z_t - t v."""
    return z_t - _view(t, z_t) * v


def flow_to_eps(v: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
    """eps = z_t + (1 - t) v."""
    return z_t + (1 - _view(t, z_t)) * v


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t' = a t / (1 + (a - 1) t) (Esser et al. 2024, eq. 23); a = 1 leaves t as it is."""
    return shift * t / (1 + (shift - 1) * t)


class RectifiedFlow(Objective):
    name = "rectified_flow"
    default_sampler = "flow-euler"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        timestep_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        offset_noise: float = 0.0,
        timestep_range: list[float] | None = None,
    ):
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"timestep sampling {timestep_sampling!r}; allowed: {' | '.join(TIMESTEP_SAMPLING)}"
            )
        self.num_train_timesteps = num_train_timesteps
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.shift = shift
        self.offset_noise = offset_noise
        self.timestep_range = list(timestep_range) if timestep_range is not None else None

    @classmethod
    def from_config(cls, cfg: NoiseConfig) -> RectifiedFlow:
        return cls(
            cfg.num_train_timesteps, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.shift,
            cfg.offset_noise, cfg.timestep_range,
        )  # fmt: skip

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> RectifiedFlow:
        return cls(config.get("num_train_timesteps", 1000), shift=config.get("shift", 1.0))

    def sample_timesteps(self, batch: int, rng: StepRandom | None, device: torch.device) -> Tensor:
        if self.timestep_sampling == "uniform":
            u = rng.rand(batch) if rng is not None else torch.rand(batch, device=device)
            t = u.to(device)
        else:
            n = rng.randn(batch) if rng is not None else torch.randn(batch, device=device)
            t = torch.sigmoid(self.logit_mean + self.logit_std * n.to(device))
        t = shift_time(t, self.shift)  # (B,) in [0, 1]
        if self.timestep_range is not None:  # noise.timestep_range: into [lo, hi]
            lo, hi = self.timestep_range
            t = lo + (hi - lo) * t
        return t

    def noised(self, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return interpolate(z0, eps, t)

    def target(self, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return eps - z0

    def model_timestep(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps

    def to_x0(self, pred: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        return flow_to_x0(pred, z_t, t)

    def to_eps(self, pred: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        return flow_to_eps(pred, z_t, t)

    def scheduler_config(self) -> dict[str, Any]:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.num_train_timesteps, shift=self.shift
        )
        return {"_class_name": type(scheduler).__name__, **scheduler.config}

    def timestep_grid(self, points: int) -> Tensor:
        return torch.linspace(0, 1, points)

    def time_at(self, u: Tensor) -> Tensor:
        return u.float()
