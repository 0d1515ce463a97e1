"""The stage-1 objective on one batch, for the autoencoder and for the discriminator.

    loss_ae = rec + w_p * LPIPS + w_kl * KL + [gan_on] * w_g * lambda * (-mean D(x_rec))
    loss_d  = D_LOSSES[kind](D(x), D(x_rec))

lambda is the adaptive weight at the decoder's last layer (Esser et al. 2021, eq. 7).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from autoencoder.config import VAELossConfig
from autoencoder.losses import D_LOSSES, adaptive_weight, generator_loss, kl_loss, reconstruction_loss
from autoencoder.perceptual import perceptual_loss


def autoencoder_objective(
    model: torch.nn.Module,
    disc: torch.nn.Module,
    x: Tensor,
    cfg: VAELossConfig,
    last_layer: torch.nn.Parameter,
    gan_on: bool,
    lpips: torch.nn.Module | None = None,
    grad_scale: float = 1.0,
    noise: Tensor | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(loss_ae, x_rec, detached terms) for images ``x`` (B, 3, H, W) in [-1, 1].

    ``model``: an ``AutoencoderTrainingForward`` (possibly wrapped by accelerate); ``disc``: the
    discriminator for the adversarial term, not DDP-wrapped (its weights get no gradient here);
    ``grad_scale``: the fp16 loss scale, so the adaptive weight's gradients do not underflow;
    ``noise``: the posterior's eps (B, C, h, w); ``reduce``: averages a gradient over processes, so
    that the adaptive weight is that of the global batch (``accelerator.reduce(g, "mean")``).
    """
    x_rec, mean, logvar = model(x, noise)  # (B, 3, H, W), (B, C, h, w) x 2
    rec = reconstruction_loss(x, x_rec, cfg.rec_loss)
    kl = kl_loss(mean, logvar)
    terms = {"rec_loss": rec, "kl_loss": kl}
    nll = rec
    if lpips is not None:
        p_loss = perceptual_loss(lpips, x, x_rec)
        nll = nll + cfg.perceptual_weight * p_loss
        terms["perceptual_loss"] = p_loss
    loss = nll + cfg.kl_weight * kl
    if gan_on:
        g_loss = generator_loss(disc(x_rec))
        weight = cfg.disc_weight * adaptive_weight(
            nll * grad_scale, g_loss * grad_scale, last_layer, reduce=reduce
        )
        loss = loss + weight * g_loss
        terms.update(g_loss=g_loss, disc_weight=weight)
    terms["loss"] = loss
    return loss, x_rec, {k: v.detach() for k, v in terms.items()}


def discriminator_objective(
    disc: torch.nn.Module, x: Tensor, x_rec: Tensor, cfg: VAELossConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss_d, detached terms): real images against detached reconstructions."""
    logits_real = disc(x.detach())  # (B, 1, h, w) patch logits
    logits_fake = disc(x_rec.detach())
    d_loss = D_LOSSES[cfg.disc_loss](logits_real, logits_fake)
    terms = {"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
    return d_loss, {k: v.detach() for k, v in terms.items()}
