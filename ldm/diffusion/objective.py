"""What a training objective is: one interface that training, sampling and evaluation share.

An objective says what a training step draws (timesteps, noise), the noised input and the target,
the loss weight, the timestep the UNet sees, the prediction algebra (``to_x0``, ``to_eps``) and the
scheduler config the export carries. The loss is the same for every objective
(Ho et al. 2020, eq. 14; Rombach et al. 2022, eq. 2):

    t ~ p(t), eps ~ N(0, I), z_t = noised(z_0, eps, t)
    loss = mean_b w(t_b) * || denoiser(z_t, model_timestep(t)) - target(z_0, eps, t) ||^2 / D
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ldm.core.randomness import StepRandom
from ldm.diffusion.config import NoiseConfig

# (z_t, timestep as the UNet takes it) -> the UNet's prediction, conditioning bound in
Denoiser = Callable[[Tensor, Tensor], Tensor]


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


class Objective(ABC):
    """One objective; ``t`` is the objective's own time (DDPM: an index, flow: a float in [0, 1])."""

    name: ClassVar[str]  # the registry key (``noise.objective``)
    default_sampler: ClassVar[str]  # the pipeline's sampler when none is named
    num_train_timesteps: int
    offset_noise: float = 0.0

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: NoiseConfig) -> Objective:
        """The objective ``noise.*`` describes (training)."""

    @classmethod
    @abstractmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> Objective:
        """The objective of an exported model, from its ``scheduler/`` config (sampling, evaluation)."""

    @abstractmethod
    def sample_timesteps(self, batch: int, rng: StepRandom | None, device: torch.device) -> Tensor:
        """t for a batch, (B,)."""

    @abstractmethod
    def noised(self, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """z_t, (B, C, h, w)."""

    @abstractmethod
    def target(self, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the UNet regresses at z_t, (B, C, h, w)."""

    @abstractmethod
    def model_timestep(self, t: Tensor) -> Tensor:
        """The timestep the UNet is given for t (what the sampling scheduler feeds it too)."""

    @abstractmethod
    def to_x0(self, pred: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """The clean latent the prediction implies."""

    @abstractmethod
    def to_eps(self, pred: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """The noise the prediction implies."""

    @abstractmethod
    def scheduler_config(self) -> dict[str, Any]:
        """The diffusers scheduler config of the export's ``scheduler/``."""

    @abstractmethod
    def timestep_grid(self, points: int) -> Tensor:
        """``points`` values of t spread over the whole range (the loss-per-timestep curve)."""

    @abstractmethod
    def time_at(self, u: Tensor) -> Tensor:
        """t at the fractions ``u`` in [0, 1) of the schedule (DDPM: floor(u T); flow: u), (B,)."""

    def loss_weight(self, t: Tensor) -> Tensor | None:
        """Per-sample weight w(t), (B,); None: 1."""
        return None

    def sample_noise(self, z0: Tensor, rng: StepRandom | None = None) -> Tensor:
        return sample_noise(z0, self.offset_noise, rng)

    def losses(
        self, denoiser: Denoiser, z0: Tensor, rng: StepRandom | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Per-sample weighted squared error for clean latents ``z0`` (B, C, h, w), (B,); draws t and
        eps from ``rng`` (the training loop's ``StepRandom``) or else the global RNG.

        ``mask`` (B, 1, h, w) in [0, 1]: per-latent-pixel weights (masked loss, as kohya's
        ``--masked_loss``): mean over pixels of m * (pred - target)^2, so a zero weight takes a pixel
        out of the loss and its gradient, and all ones is the plain loss."""
        t = self.sample_timesteps(z0.shape[0], rng, z0.device)  # (B,)
        eps = self.sample_noise(z0, rng)  # (B, C, h, w)
        z_t = self.noised(z0, eps, t)
        pred = denoiser(z_t, self.model_timestep(t))  # (B, C, h, w)
        per_sample = (pred.float() - self.target(z0, eps, t).float()).square()
        if mask is not None:
            per_sample = per_sample * mask.to(per_sample)  # broadcast over the channels
        per_sample = per_sample.flatten(1).mean(1)  # (B,)
        weight = self.loss_weight(t)
        return per_sample if weight is None else per_sample * weight

    def loss(
        self, denoiser: Denoiser, z0: Tensor, rng: StepRandom | None = None, mask: Tensor | None = None
    ) -> Tensor:
        return self.losses(denoiser, z0, rng, mask).mean()
