"""Image-quality figures: PSNR, SSIM and sample diversity, as pure functions on batches in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR in dB on [0, 1] intensities: 10 log10(1 / MSE), capped at ``max_db``."""
    a, b = (x.float() + 1) / 2, (y.float() + 1) / 2
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_db / 10)))).clamp_max(max_db)


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) on [0, 1] intensities, Gaussian window 11 / 1.5, K1=0.01, K2=0.03.

    SSIM = ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
    averaged over the valid (unpadded) window positions and the channels.
    """
    a, b = ((x.float() + 1) / 2).clamp(0, 1), ((y.float() + 1) / 2).clamp(0, 1)
    c = a.shape[1]
    window = min(window, a.shape[-1], a.shape[-2])
    w = _gaussian_window(window, sigma, c).to(a.device)
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b**2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def pairwise_diversity(images: torch.Tensor, groups: list[str]) -> float:
    """Mean RMS pixel distance (on [0, 1] intensities) between the images of each group (e.g. one
    prompt under different seeds), averaged over all same-group pairs. 0 when every seed gives the
    same image; groups with a single image are ignored."""
    x = ((images.float() + 1) / 2).clamp(0, 1).flatten(1)  # (N, D)
    distances = []
    for name in dict.fromkeys(groups):
        members = x[[i for i, g in enumerate(groups) if g == name]]
        if len(members) > 1:
            d = torch.cdist(members, members) / members.shape[1] ** 0.5  # (k, k) RMS distances
            distances.append(d[torch.triu_indices(len(members), len(members), 1).unbind()])
    if not distances:
        raise ValueError("pairwise_diversity needs at least one group with two or more images")
    return float(torch.cat(distances).mean())
