"""The stage-1 objective: reconstruction, KL, PatchGAN adversarial terms and the adaptive weight.

Small pure functions; the training loop combines them as (Rombach et al. 2022, LDM, appendix G;
Esser et al. 2021, Taming Transformers):

    loss_ae = rec + w_p * perceptual + w_kl * KL + disc_factor * lambda * w_g * generator_loss
    loss_d  = disc_factor * D_LOSSES[kind](D(x), D(x_rec.detach()))
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _l1(x: Tensor, x_rec: Tensor) -> Tensor:
    return (x - x_rec).abs().mean()


def _l2(x: Tensor, x_rec: Tensor) -> Tensor:
    return (x - x_rec).square().mean()


RECONSTRUCTION_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"l1": _l1, "l2": _l2}


def reconstruction_loss(x: Tensor, x_rec: Tensor, kind: str) -> Tensor:
    """Pixel loss, mean over all elements: l1 = mean|x - x_rec|, l2 = mean (x - x_rec)^2."""
    if kind not in RECONSTRUCTION_LOSSES:
        raise ValueError(
            f"unknown reconstruction loss {kind!r}; choose one of {sorted(RECONSTRUCTION_LOSSES)}"
        )
    return RECONSTRUCTION_LOSSES[kind](x, x_rec)


def kl_loss(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2).

    Summed over all latent dimensions (C, H, W) and averaged over the batch, as CompVis LDM's
    DiagonalGaussianDistribution.kl (Kingma & Welling 2014, appendix B). mean, logvar: (B, C, H, W).
    """
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)  # (B, C, H, W)
    return kl.flatten(1).sum(dim=1).mean()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss (Lim & Ye 2017, Geometric GAN; Miyato et al. 2018):
    0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN discriminator loss (Goodfellow et al. 2014) in softplus form:
    0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_rec)))), i.e. BCE on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: Tensor) -> Tensor:
    """Adversarial loss of the autoencoder (the generator): -mean(D(x_rec)) (Esser et al. 2021)."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: Tensor,
    g_loss: Tensor,
    last_layer: torch.nn.Parameter,
    max_weight: float = 1e4,
    eps: float = 1e-4,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Adaptive GAN weight (Esser et al. 2021, Taming Transformers, eq. 7):

        lambda = ||grad_L rec_loss|| / (||grad_L g_loss|| + eps),  L = the decoder's last layer,

    clamped to [0, max_weight] and detached. rec_loss is the term the GAN loss is balanced against
    (reconstruction, plus perceptual when on). Both graphs are retained, so the caller can still
    backpropagate through rec_loss and g_loss. ``reduce`` maps each gradient to its mean over
    processes first, so that with N processes lambda is the one of the global batch.
    """
    for name, loss in (("rec_loss", rec_loss), ("g_loss", g_loss)):
        if not loss.requires_grad:
            raise ValueError(
                f"adaptive_weight needs {name} with a graph back to last_layer; call it with grad enabled"
            )
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    if reduce is not None:
        rec_grad, g_grad = reduce(rec_grad), reduce(g_grad)
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
