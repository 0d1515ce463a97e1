"""FID from a local Inception file: a randomly initialised Inception-v3 saved to disk, no download."""

import pytest
import torch
from safetensors.torch import save_file

from ldm.fid import frechet_distance, frechet_distance_from_images, load_inception


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=True)
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_frechet_distance_of_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) + 2.0  # mean shift 2 in each of 3 dims
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(12.0, rel=0.05)  # ||mu_a - mu_b||^2 = 3 * 2^2


def test_fid_runs_on_a_random_inception_saved_to_disk(inception_file):
    g = torch.Generator().manual_seed(1)
    real = torch.rand(12, 3, 32, 32, generator=g) * 2 - 1
    fake = (real + 0.5 * torch.randn(12, 3, 32, 32, generator=g)).clamp(-1, 1)
    same = frechet_distance_from_images(real, real, inception_file)
    different = frechet_distance_from_images(real, fake, inception_file)
    assert abs(same) < 1e-6 * different  # a random network's features are large: compare relatively
    assert load_inception(inception_file).fc.__class__.__name__ == "Identity"
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        load_inception(inception_file.parent / "missing.safetensors")
