"""FID and KID from a local Inception file: a randomly initialised Inception-v3 saved to disk, no download."""

import pytest
import torch

from ldm.eval.fid import (
    frechet_distance,
    frechet_distance_from_images,
    inception_features,
    kernel_inception_distance,
    load_inception,
)


def test_frechet_distance_of_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) + 2.0  # mean shift 2 in each of 3 dims
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(12.0, rel=0.05)  # ||mu_a - mu_b||^2 = 3 * 2^2


def test_fid_runs_on_a_random_inception_saved_to_disk(inception_file):
    g = torch.Generator().manual_seed(1)
    real = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    fake = (real + 0.5 * torch.randn(6, 3, 32, 32, generator=g)).clamp(-1, 1)
    same = frechet_distance_from_images(real, real, inception_file)
    different = frechet_distance_from_images(real, fake, inception_file)
    assert abs(same) < 1e-6 * different  # a random network's features are large: compare relatively
    assert load_inception(inception_file).fc.__class__.__name__ == "Identity"
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        load_inception(inception_file.parent / "missing.safetensors")


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift(inception_file):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.02 < shifted  # unbiased: two samples of one distribution give ~0
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(a[:1], b)
    net = load_inception(inception_file)
    real = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    fake = (real + torch.randn(6, 3, 32, 32, generator=g)).clamp(-1, 1)
    real_features, fake_features = inception_features(net, real), inception_features(net, fake)
    kid, std = kernel_inception_distance(real_features, fake_features, subsets=5)
    same, _ = kernel_inception_distance(real_features, real_features, subsets=5)
    # a random network's features are huge (norms ~1e12, so KID ~1e64): compare relatively
    assert kid > 0 and abs(same) < 1e-2 * kid  # a set against itself ~0; against the noisy set, positive
    assert std < 1e-6 * kid  # 6 images <= subset_size: every subset is the whole set, the estimates agree
