"""The denoising loss as a function of the timestep, on held-out latents.

    loss(t) = E_{z_0, eps} || model(z_t, t) - target_t ||^2 / D,  z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps

at ``num_points`` timesteps spread evenly over 0..T-1, with the training target (eps, v or z_0).
Where training converges, the curve is high at small t for eps-prediction (the noise is hard to
read off a nearly clean latent) and low at large t; it shows which noise levels a model learned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.noise import add_noise, target
from ldm.eval.bound import Model


@torch.no_grad()
def loss_per_timestep(
    model: Model,
    z0: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str,
    num_points: int = 20,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(timesteps (P,), per-sample mean squared error (P, B)) for clean latents ``z0`` (B, C, h, w)."""
    generator = generator or torch.Generator().manual_seed(0)
    steps = torch.linspace(0, len(alphas_cumprod) - 1, num_points).round().long()
    losses = []
    for i in steps.tolist():
        t = torch.full((z0.shape[0],), i, dtype=torch.long, device=z0.device)
        eps = torch.randn(z0.shape, generator=generator).to(z0.device)
        z_t = add_noise(z0, eps, t, alphas_cumprod)
        pred = model(z_t, t).float()
        goal = target(prediction_type, z0, eps, t, alphas_cumprod).float()
        losses.append((pred - goal).square().flatten(1).mean(1))
    return steps, torch.stack(losses)
