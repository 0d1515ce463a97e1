"""The training loss as a function of the timestep, on held-out latents.

    loss(t) = E_{z_0, eps} || model(z_t, t) - target_t ||^2 / D,  z_t = noised(z_0, eps, t)

at ``num_points`` timesteps spread evenly over the objective's range, with its training target
(DDPM: eps, v or z_0; rectified flow: the velocity eps - z_0). For eps-prediction the curve is high
at small t (the noise is hard to read off a nearly clean latent) and low at large t; it shows which
noise levels a model learned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.objective import Objective
from ldm.eval.bound import Model


@torch.no_grad()
def loss_per_timestep(
    model: Model,
    z0: Tensor,
    objective: Objective,
    num_points: int = 20,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(the UNet's timesteps (P,), per-sample mean squared error (P, B)) for clean latents ``z0`` (B, C, h, w)."""
    generator = generator or torch.Generator().manual_seed(0)
    steps = objective.timestep_grid(num_points)
    losses = []
    for value in steps.tolist():
        t = torch.full((z0.shape[0],), value, dtype=steps.dtype, device=z0.device)
        eps = torch.randn(z0.shape, generator=generator).to(z0.device)
        z_t = objective.noised(z0, eps, t)
        pred = model(z_t, objective.model_timestep(t)).float()
        goal = objective.target(z0, eps, t).float()
        losses.append((pred - goal).square().flatten(1).mean(1))
    return objective.model_timestep(steps), torch.stack(losses)
