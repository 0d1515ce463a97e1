"""The variational bound of a diffusion model in bits per dimension (Ho et al. 2020, eq. 5).

    -log p(z_0) <= L_T + sum_{t=2..T} L_{t-1} + L_0
    L_T     = KL(q(z_T | z_0) || N(0, I))
    L_{t-1} = KL(q(z_{t-1} | z_t, z_0) || p(z_{t-1} | z_t))
    L_0     = -log p(z_0 | z_1)

q(z_{t-1} | z_t, z_0) = N(mu~_t, beta~_t I), the Gaussian posterior of eq. 6-7:
    mu~_t   = sqrt(abar_{t-1}) beta_t / (1 - abar_t) z_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) z_t
    beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
p(z_{t-1} | z_t) = N(mu~_t(z_t, z^_0), sigma_t^2 I): the posterior mean at the model's estimate z^_0,
with the model's fixed variance sigma_t^2 = beta~_t ("fixed_small") or beta_t ("fixed_large").
beta~_1 = 0, so as in Nichol & Dhariwal (2021) its first entry is replaced by beta~_2.

Latents are continuous, so there L_0 is the Gaussian density N(z_0; z^_0, sigma_1^2) of the latent
itself: the bound is on the differential entropy of the latents, comparable between models on the
same autoencoder, and may be negative. Pixels (a pixel-space model, ``decoder="discretized"``) are
256 levels, and L_0 is DDPM's discretized decoder (eq. 13): the bound is then a true negative
log-likelihood of the 8-bit images in bits per dimension, the figure of the DDPM paper (CIFAR-10:
3.70 trained on the bound, 3.75 with L_simple).

The progressive lossy code of DDPM (section 4.3, Algorithm 3-4) sends x_T, ..., x_t: its rate at t
is L_T + sum_{s > t} L_{s-1}, its distortion the RMSE of x^_0(x_t) against x_0; ``rate_distortion``
turns the bound's terms into that curve.

Index i = t - 1 is diffusers' timestep: ``alphas_cumprod[i]`` is abar_t.
The sum over t = 2..T is estimated by stratified sampling (one random t in each of S equal strata,
weighted by the stratum's size), which is unbiased and exact when S = T - 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.ddpm import ddpm_to_x0

VARIANCE_TYPES = ("fixed_small", "fixed_large")


def gaussian_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def gaussian_nll(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """-log N(x; mean, var) elementwise, in nats (a density: continuous data)."""
    return 0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def discretized_gaussian_nll(x: Tensor, mean: Tensor, var: Tensor, bins: int = 256) -> Tensor:
    """-log p(x | mean, var) elementwise, in nats, for pixels ``x`` of ``bins`` levels scaled to
    [-1, 1]: DDPM's discretized decoder for L_0 (Ho et al. 2020, eq. 13), the Gaussian's mass on the
    pixel's bin,

        p(x) = Phi((x + h - mean) / sigma) - Phi((x - h - mean) / sigma),   h = 1 / (bins - 1)

    with the edge bins reaching to -inf (x = -1) and +inf (x = 1). ``x`` is rounded to its level;
    computed in float64; ``variational_bound``'s L_0 for pixels."""
    h = 1.0 / (bins - 1)
    x = torch.round((x.double() + 1) / (2 * h)) * (2 * h) - 1  # (on the grid of levels)
    sigma, mean = var.double().sqrt(), mean.double()
    upper = (x + h - mean) / sigma
    lower = (x - h - mean) / sigma
    interior = log_mass(lower, upper, upper_tail=mean <= x)
    log_p = torch.where(
        x <= -1 + h / 2,
        torch.special.log_ndtr(upper),
        torch.where(x >= 1 - h / 2, torch.special.log_ndtr(-lower), interior),
    )
    return -log_p  # (float64)


def log_mass(lower: Tensor, upper: Tensor, upper_tail: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) in log space, accurate far in either tail (where the difference of
    the two CDFs underflows to 0): with a = log Phi of the nearer tail,
    log(Phi(u) - Phi(l)) = a(u) + log1p(-exp(a(l) - a(u))), mirrored for the upper tail."""
    ln = torch.special.log_ndtr
    lo_tail = ln(upper) + torch.log1p(-torch.exp(ln(lower) - ln(upper)).clamp(max=1 - 1e-16))
    hi_tail = ln(-lower) + torch.log1p(-torch.exp(ln(-upper) - ln(-lower)).clamp(max=1 - 1e-16))
    return torch.where(upper_tail, hi_tail, lo_tail)


def posterior(z0: Tensor, zt: Tensor, i: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, variance) of q(z_{t-1} | z_t, z_0) at diffusers index i = t - 1 >= 0 (eq. 6-7)."""
    ac = alphas_cumprod.double().to(zt.device)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    beta = 1 - ac / ac_prev
    shape = (-1, *([1] * (zt.ndim - 1)))
    a, a_prev, b = ac[i].view(shape), ac_prev[i].view(shape), beta[i].view(shape)
    mean = (a_prev.sqrt() * b / (1 - a)) * z0 + ((1 - b).sqrt() * (1 - a_prev) / (1 - a)) * zt
    return mean, ((1 - a_prev) / (1 - a) * b).expand_as(zt)


def model_variance(variance_type: str, alphas_cumprod: Tensor) -> Tensor:
    """sigma_t^2 for every index: beta~_t or beta_t, the first entry replaced by beta~_2 (beta~_1 = 0)."""
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(
            f"variance_type {variance_type!r}: the bound needs a fixed variance ({' | '.join(VARIANCE_TYPES)})"
        )
    ac = alphas_cumprod.double()
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    beta = 1 - ac / ac_prev
    beta_tilde = (1 - ac_prev) / (1 - ac) * beta
    var = beta_tilde if variance_type == "fixed_small" else beta.clone()
    var[0] = beta_tilde[1]
    return var


def predicted_z0(kind: str, pred: Tensor, zt: Tensor, i: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """z^_0 from the model output (eps, v or z_0), in float64: ``ldm.diffusion.ddpm.ddpm_to_x0``."""
    shape = (-1, *([1] * (zt.ndim - 1)))
    return ddpm_to_x0(kind, pred, zt, alphas_cumprod.double().to(zt.device)[i].view(shape))


def prior_kl(z0: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """L_T per sample in nats: KL(N(sqrt(abar_T) z_0, 1 - abar_T) || N(0, 1)), summed over dimensions."""
    a = alphas_cumprod.double()[-1].to(z0.device)
    mean, var = a.sqrt() * z0, (1 - a).expand_as(z0)
    return gaussian_kl(mean, var, torch.zeros_like(z0), torch.ones_like(z0)).flatten(1).sum(1)


def strata_edges(num_timesteps: int, count: int) -> Tensor:
    """The edges of ``count`` near-equal strata of 1..T-1: stratum k is [edges[k], edges[k + 1])."""
    return torch.linspace(1, num_timesteps, min(count, num_timesteps - 1) + 1).round().long()


def strata(num_timesteps: int, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One random index in each of ``count`` near-equal strata of 1..T-1, and each stratum's size."""
    edges = strata_edges(num_timesteps, count)
    lo, hi = edges[:-1], edges[1:]
    offsets = (torch.rand(len(lo), generator=generator) * (hi - lo)).long()
    return lo + offsets, (hi - lo).double()


Model = Callable[[Tensor, Tensor], Tensor]  # (z_t, index) -> prediction


@torch.no_grad()
def variational_bound(
    model: Model,
    z0: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str,
    variance_type: str = "fixed_small",
    num_strata: int = 50,
    generator: torch.Generator | None = None,
    decoder: str = "gaussian",
) -> dict[str, Tensor]:
    """Per-sample bound terms of ``z0`` (B, C, h, w) in nats and the total in bits per dimension.

    ``decoder``: gaussian (latents: a density) | discretized (pixels in [-1, 1] of 256 levels).
    Returns ``prior`` (L_T), ``diffusion`` (sum of L_{t-1}, estimated), ``decoder`` (L_0), ``bpd``
    (all (B,)), ``timesteps`` / ``weights`` ((S,): the sampled indices and their strata's sizes),
    ``per_timestep`` (S, B): the L_{t-1} (nats) at each, and ``per_timestep_mse`` (S, B): the mean
    squared error of z^_0(z_t) there (pixels: clipped to [-1, 1]).
    """
    if decoder not in ("gaussian", "discretized"):
        raise ValueError(f"decoder={decoder!r}: gaussian (latents) | discretized (pixels)")
    generator = generator or torch.Generator().manual_seed(0)
    z0 = z0.double()
    if decoder == "discretized":  # every term on the 8-bit image itself (resizing may leave it off the grid)
        z0 = torch.round((z0.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    variance = model_variance(variance_type, alphas_cumprod).to(z0.device)

    def step_terms(i: int) -> tuple[Tensor, ...]:
        index = torch.full((z0.shape[0],), i, dtype=torch.long, device=z0.device)
        eps = torch.randn(z0.shape, generator=generator, dtype=torch.float64).to(z0.device)
        a = alphas_cumprod.double().to(z0.device)[i]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = model(zt.float(), index).double()
        z0_hat = predicted_z0(prediction_type, pred, zt, index, alphas_cumprod)
        mean_q, var_q = posterior(z0, zt, index, alphas_cumprod)
        mean_p, _ = posterior(z0_hat, zt, index, alphas_cumprod)
        return mean_q, var_q, mean_p, variance[i].expand_as(zt), z0_hat

    indices, weights = strata(len(alphas_cumprod), num_strata, generator)
    per_timestep, per_timestep_mse = [], []
    for i in indices.tolist():
        mean_q, var_q, mean_p, var_p, z0_hat = step_terms(i)
        per_timestep.append(gaussian_kl(mean_q, var_q, mean_p, var_p).flatten(1).sum(1))
        if decoder == "discretized":  # pixels: x^_0 clipped to the data's range, as DDPM's sampler does
            z0_hat = z0_hat.clamp(-1, 1)
        per_timestep_mse.append((z0_hat - z0).pow(2).flatten(1).mean(1))
    per_timestep_t = torch.stack(per_timestep)  # (S, B)
    diffusion = (weights.to(z0.device)[:, None] * per_timestep_t).sum(0)
    *_, var_0, z0_hat = step_terms(0)
    nll = discretized_gaussian_nll if decoder == "discretized" else gaussian_nll
    decoder_nats = nll(z0, z0_hat, var_0).flatten(1).sum(1)
    prior = prior_kl(z0, alphas_cumprod)
    dims = z0[0].numel()
    return {
        "prior": prior,
        "diffusion": diffusion,
        "decoder": decoder_nats,
        "bpd": (prior + diffusion + decoder_nats) / (dims * math.log(2)),
        "timesteps": indices,
        "weights": weights,
        "strata_end": strata_edges(len(alphas_cumprod), num_strata)[1:],
        "per_timestep": per_timestep_t,
        "per_timestep_mse": torch.stack(per_timestep_mse),
    }


def rate_distortion(
    prior: Tensor,
    per_timestep: Tensor,
    weights: Tensor,
    mse: Tensor,
    dims: int,
    timesteps: Tensor,
    strata_end: Tensor,
    value_range: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """DDPM's progressive lossy compression curve (Ho et al. 2020, section 4.3) at the sampled
    indices i_k (ascending): (rate in bits/dim, distortion as RMSE on the [0, 255] scale).

        rate(i_k)       = (L_T + sum_{j > k} w_j L(i_j) + (end_k - i_k - 1) L(i_k)) / (D ln 2)
        distortion(i_k) = sqrt(mean_B MSE(x^_0(x_{i_k}), x_0)) * 255 / value_range

    the stratified estimate of L_T and the terms above i_k (what was sent to reach x at i_k; a stratum
    [lo_k, end_k) counts only its part above i_k). ``prior`` (B,) nats; ``per_timestep`` and ``mse``
    (S, B); ``weights``, ``timesteps`` and ``strata_end`` (S,): ``variational_bound``'s;
    ``value_range``: the width of the data's interval (2 for [-1, 1])."""
    term = per_timestep.double().mean(1)  # (S,) nats
    weighted = weights.double() * term
    above = weighted.flip(0).cumsum(0).flip(0) - weighted  # strata j > k
    own = (strata_end.double() - timesteps.double() - 1) * term
    rate = (prior.double().mean() + above + own) / (dims * math.log(2))
    distortion = mse.double().mean(1).sqrt() * 255.0 / value_range
    return rate, distortion
