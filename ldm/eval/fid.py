"""FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) from a local Inception-v3 weights file.

FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) on 2048-d pool features.
KID = the unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets;
unlike FID it has no bias that depends on the sample count, so it suits small sample sets.
Nothing is downloaded: without a weights file the metric is left out by the caller.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.core.errors import MissingFileError
from ldm.core.safe_load import load_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_inception(weights: str | Path, allow_pickle: bool = False) -> torch.nn.Module:
    """torchvision's Inception-v3 with the given weights: safetensors, torchvision's own download
    (``inception_v3_google-0cc3c7bd.pth``, checked against its hash), or with ``allow_pickle`` any
    torch file read with weights_only=True (``ldm.core.safe_load``)."""
    from torchvision.models import inception_v3  # torchvision comes with open_clip_torch

    path = Path(weights)
    if not path.is_file():
        raise MissingFileError(f"no Inception weights at {path}; set eval.inception_weights to a local file")
    state = load_state_dict(path, allow_pickle)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.load_state_dict(state)
    model.fc = torch.nn.Identity()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def inception_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 2048) pool features at 299 x 299."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    feats = []
    for start in range(0, len(images), batch_size):
        x = (images[start : start + batch_size].float().clamp(-1, 1) + 1) / 2
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats.append(model((x - mean) / std).double())
    return torch.cat(feats)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix, by its eigendecomposition."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """FID between two feature sets (N, D). Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)),
    a symmetric form whose eigenvalues are real and stable even for rank-deficient covariances."""
    feats_a, feats_b = feats_a.double(), feats_b.double()
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = torch.cov(feats_a.T), torch.cov(feats_b.T)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(value)


def frechet_distance_from_images(
    real: torch.Tensor, fake: torch.Tensor, weights: str | Path, allow_pickle: bool = False
) -> float:
    model = load_inception(weights, allow_pickle)
    return frechet_distance(inception_features(model, real), inception_features(model, fake))


def kernel_inception_distance(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """(mean, std) over ``subsets`` random subsets of the unbiased MMD^2 with the cubic polynomial kernel."""
    generator = generator or torch.Generator().manual_seed(0)
    a, b = feats_a.double(), feats_b.double()
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {len(a)} and {len(b)}")
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:m]]
        y = b[torch.randperm(len(b), generator=generator)[:m]]
        k_xx, k_yy, k_xy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off_diagonal = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (
            m * (m - 1)
        )
        values.append(off_diagonal - 2 * k_xy.mean())
    stacked = torch.stack(values)
    return float(stacked.mean()), float(stacked.std()) if subsets > 1 else 0.0
