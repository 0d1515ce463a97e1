"""Condition dropout for classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").

One network learns both the conditional eps(z_t, c) and the unconditional eps(z_t, {}) model: during
training each caption is replaced by the null condition with probability p_uncond (Algorithm 1 of the
paper; 0.1 to 0.2 there, 0.1 in Stable Diffusion). The null condition is the empty caption "", whose
context is also the default negative prompt at sampling time, where
eps = eps(z_t, {}) + s * (eps(z_t, c) - eps(z_t, {})).
"""

from __future__ import annotations

import torch
from torch import Tensor

NULL_CAPTION = ""  # the unconditional caption


def uncond_mask(
    batch: int,
    p: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    uniform: Tensor | None = None,
) -> Tensor:
    """(B,) bool, True where the condition is dropped: independent Bernoulli(p) draws, u < p.

    u is ``uniform`` (B,) when given (e.g. the training loop's process-count-independent draws),
    else drawn on the generator's device (reproducible for a given generator state); the mask is
    then moved to ``device``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"condition dropout probability must be in [0, 1), got {p}")
    if uniform is None:
        draw_device = generator.device if generator is not None else "cpu"
        uniform = torch.rand(batch, generator=generator, device=draw_device)
    mask = uniform < p  # (B,), on the device of the draws
    return mask.to(device) if device is not None else mask


def drop_captions(
    captions: list[str], p: float, generator: torch.Generator | None = None, uniform: Tensor | None = None
) -> list[str]:
    """Each caption replaced by "" with probability ``p`` (Ho & Salimans 2022, Algorithm 1)."""
    mask = uncond_mask(len(captions), p, generator, uniform=uniform)
    return [NULL_CAPTION if drop else caption for caption, drop in zip(captions, mask.tolist(), strict=True)]


def apply_uncond(context: Tensor, uncond_context: Tensor, mask: Tensor) -> Tensor:
    """Context (B, L, D) with the rows where ``mask`` (B,) is True replaced by ``uncond_context`` (1 or B, L, D).

    For cached text embeddings: drop the condition after encoding instead of the caption before it.
    """
    return torch.where(
        mask.to(context.device)[:, None, None], uncond_context.to(context), context
    )  # (B, L, D)
