"""The one denoising core every entry point (txt2img, img2img, inpainting) runs.

for t in timesteps:  pred = UNet([z; z], t, [uncond; cond])  (one call on the doubled batch)
                     pred = pred_u + s (pred_c - pred_u)     (classifier-free guidance)
                     pred = guided by a classifier            (optional: ldm.pipelines.classifier_guidance)
                     z = scheduler.step(pred, t, z)          (any sampler, either objective)
                     z = keep * known_t + (1 - keep) * z     (inpainting only: latent blending)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor
from tqdm.auto import tqdm

from conditioning.conditioner import Conditioner, Conditioning
from ldm.pipelines.classifier_guidance import ClassifierGuide
from ldm.pipelines.guidance import guided_prediction, rescale_guidance


def noise_to(scheduler: SchedulerMixin, z0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """``z0`` noised to ``timesteps`` as the scheduler defines it (DDPM family: ``add_noise``; flow
    matching: ``scale_noise``)."""
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(z0, noise, timesteps)
    return scheduler.scale_noise(z0, timesteps, noise)


def initial_sigma(scheduler: SchedulerMixin) -> float:
    """The std of z_T relative to N(0, I): sigma_max for Euler-type samplers, 1 otherwise."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


@dataclass
class Blend:
    """Inpainting: after each step, the known latents at the next step's noise level where ``keep`` is 1."""

    known: Tensor  # (n, C, h, w) the encoded image
    noise: Tensor  # (n, C, h, w) the noise it is taken down the schedule with
    keep: Tensor  # (n, 1, h, w) 1 where the image is kept

    def __call__(self, scheduler: SchedulerMixin, latents: Tensor, next_t: Tensor | None) -> Tensor:
        known = self.known
        if next_t is not None:
            known = noise_to(scheduler, self.known, self.noise, next_t.repeat(len(latents)))
        return self.keep * known + (1 - self.keep) * latents


def denoise(
    unet: Callable[..., Any],
    scheduler: SchedulerMixin,
    latents: Tensor,
    timesteps: Tensor,
    cond: Conditioning,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    step_kwargs: dict[str, Any] | None = None,
    blend: Blend | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    progress: bool = False,
    guide: ClassifierGuide | None = None,
) -> Tensor:
    """z_T (n, C, h, w) -> z_0 along ``timesteps``; ``cond`` holds [uncond; cond] (2n rows) when
    ``guidance_scale`` > 1, else n rows. ``guide``: classifier guidance on top."""
    guided = guidance_scale > 1.0
    kwargs = Conditioner.unet_kwargs(cond)
    step_kwargs = step_kwargs or {}
    scale_input = getattr(scheduler, "scale_model_input", None)  # flow matching has none
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling", leave=False)):
        model_in = torch.cat([latents, latents]) if guided else latents  # (2n, C, h, w): [uncond; cond]
        if scale_input is not None:
            model_in = scale_input(model_in, t)
        pred = unet(model_in, t, **kwargs).sample
        if guided:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = guided_prediction(pred_uncond, pred_cond, guidance_scale)
            if guidance_rescale > 0:
                pred = rescale_guidance(pred, pred_cond, guidance_rescale)
        shift = None
        if guide is not None:  # at z_t as the UNet saw it
            pred, shift = guide.guided(scheduler, model_in[: len(latents)], t, pred)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
        if shift is not None:  # (ancestral DDPM: Algorithm 1's mean shift)
            latents = latents + shift
        if blend is not None:
            latents = blend(scheduler, latents, timesteps[i + 1 : i + 2] if i + 1 < len(timesteps) else None)
        if callback is not None:
            callback(i, t, latents)
    return latents
