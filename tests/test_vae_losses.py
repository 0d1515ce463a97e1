"""Stage-1 objective: losses, adaptive weight, PatchGAN shapes, offline LPIPS loading."""

import hashlib
import math
import socket
import sys

import pytest
import torch

from autoencoder.discriminator import NLayerDiscriminator
from autoencoder.losses import (
    D_LOSSES,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    kl_loss,
    reconstruction_loss,
    vanilla_d_loss,
)
from autoencoder.perceptual import load_lpips, perceptual_loss
from ldm.core.safe_load import PickleRefusedError


def test_reconstruction_loss():
    x, y = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), -2.0)
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx(2.0)
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="l1.*l2"):
        reconstruction_loss(x, y, "huber")


def test_kl_loss():
    zeros = torch.zeros(2, 4, 3, 3)
    assert kl_loss(zeros, zeros).item() == 0.0
    # one sample: mu = 1, logvar = 0 everywhere -> 0.5 * 1 per element; the other: mu = 0, logvar = log 2
    # -> 0.5 * (2 - 1 - log 2) per element; sum over 4*3*3 = 36 elements, mean over the 2 samples.
    mean = torch.stack([torch.ones(4, 3, 3), torch.zeros(4, 3, 3)])
    logvar = torch.stack([torch.zeros(4, 3, 3), torch.full((4, 3, 3), math.log(2.0))])
    expected = (36 * 0.5 + 36 * 0.5 * (1 - math.log(2.0))) / 2
    assert kl_loss(mean, logvar).item() == pytest.approx(expected, rel=1e-6)


def test_discriminator_and_generator_losses():
    t = torch.full((2, 1, 3, 3), 1.0)
    assert hinge_d_loss(2 * t, -2 * t).item() == 0.0
    assert hinge_d_loss(0 * t, 0 * t).item() == pytest.approx(1.0)
    assert hinge_d_loss(-1 * t, 1 * t).item() == pytest.approx(2.0)
    assert vanilla_d_loss(0 * t, 0 * t).item() == pytest.approx(math.log(2.0))
    assert vanilla_d_loss(3 * t, -1 * t).item() == pytest.approx(
        0.5 * (math.log1p(math.exp(-3)) + math.log1p(math.exp(-1)))
    )
    assert generator_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)
    assert D_LOSSES == {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def _tiny_decoder():
    """last layer w (2,), output = w * inp; rec = sum(a * out) and g = sum(b * out) have gradients
    a * inp and b * inp with respect to w."""
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    out = w * torch.tensor([1.0, 2.0])
    return w, out


def test_adaptive_weight_matches_hand_computation():
    w, out = _tiny_decoder()
    rec = (torch.tensor([3.0, 2.0]) * out).sum()  # grad (3, 4), norm 5
    g = (torch.tensor([0.5, 0.0]) * out).sum()  # grad (0.5, 0), norm 0.5
    lam = adaptive_weight(rec, g, w, eps=0.0)
    assert lam.item() == pytest.approx(10.0)
    assert not lam.requires_grad
    assert adaptive_weight(rec, g, w).item() == pytest.approx(5.0 / (0.5 + 1e-4))
    assert adaptive_weight(rec, 2 * g, w, eps=0.0).item() == pytest.approx(5.0)  # doubling g halves it
    assert adaptive_weight(rec, g, w, max_weight=3.0).item() == 3.0  # clamp
    # g with no gradient at all: 5 / 1e-4 = 5e4, clamped to the default 1e4
    assert adaptive_weight(rec, 0 * out.sum(), w).item() == pytest.approx(1e4)

    # the graphs survive, so the caller can still backpropagate the weighted total
    (rec + lam * g).backward()
    assert torch.allclose(w.grad, torch.tensor([3.0, 4.0]) + 10.0 * torch.tensor([0.5, 0.0]))


def test_adaptive_weight_needs_a_graph():
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="g_loss"):
        adaptive_weight((w * 2).sum(), torch.tensor(1.0), w)


@pytest.mark.parametrize(("size", "n_layers", "out_size"), [(32, 2, 6), (32, 3, 2), (64, 2, 14), (64, 3, 6)])
def test_discriminator_shapes(size, n_layers, out_size):
    disc = NLayerDiscriminator(in_channels=3, channels=8, n_layers=n_layers)
    logits = disc(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, out_size, out_size)


def test_discriminator_init_and_layout():
    disc = NLayerDiscriminator(channels=8, n_layers=3)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)] * 2
    assert len(bns) == 3
    assert all(c.bias is None for c in convs[1:4])
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.02) < 0.005
    assert all((bn.bias == 0).all() and abs(bn.weight.mean().item() - 1) < 0.02 for bn in bns)


# --- LPIPS -----------------------------------------------------------------------------------------


def test_lpips_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` raise ImportError
    module, message = load_lpips()
    assert module is None
    assert "pip install 'ldm[lpips]'" in message and "\n" not in message


def test_lpips_without_backbone_file_is_off(monkeypatch, tmp_path):
    pytest.importorskip("lpips")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torchvision cache
    module, message = load_lpips()
    assert module is None
    assert "vgg16-397923af.pth" in message and "loss.lpips_weights" in message and "\n" not in message
    module, message = load_lpips(str(tmp_path / "nowhere.pth"))
    assert module is None and "nowhere.pth" in message


@pytest.fixture(scope="module")
def vgg16_state():
    """A randomly initialised torchvision VGG16 state dict: all of `features`, plus one classifier
    tensor standing in for the classifier (that the loader must ignore), to keep the file small."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    return {k: v for k, v in state.items() if k.startswith("features.") or k == "classifier.6.bias"}


def _no_network(*args, **kwargs):
    raise AssertionError("LPIPS loading tried to open a network connection")


def _torchvision_named(state, folder):
    """``state`` saved the way torchvision names its downloads: vgg16-<first 8 hex of its SHA-256>.pth."""
    tmp = folder / "vgg16.tmp"
    torch.save(state, tmp)
    path = folder / f"vgg16-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    return path


@pytest.mark.parametrize("fmt", ["torchvision-pth", "pth-allowed", "safetensors"])
def test_lpips_loads_backbone_offline(fmt, vgg16_state, tmp_path, monkeypatch):
    pytest.importorskip("lpips")
    allow_pickle = fmt == "pth-allowed"
    if fmt == "torchvision-pth":  # hash in the name checked: no allow_pickle needed
        path = _torchvision_named(vgg16_state, tmp_path)
    elif fmt == "pth-allowed":
        path = tmp_path / "vgg16.pth"
        torch.save(vgg16_state, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "vgg16.safetensors"
        save_file(vgg16_state, str(path))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)

    module, message = load_lpips(str(path), allow_pickle=allow_pickle)
    assert module is not None, message
    # torchvision features.{i} -> lpips net.slice{k}.{i}: first and last conv of the backbone
    loaded = module.net.net.state_dict()
    for src, dst in [
        ("0.weight", "slice1.0.weight"),
        ("14.bias", "slice3.14.bias"),
        ("28.weight", "slice5.28.weight"),
    ]:
        assert torch.equal(loaded[dst], vgg16_state["features." + src])
    assert not any(p.requires_grad for p in module.parameters())
    # the packaged, human-calibrated linear heads are non-negative; random 1x1 convs would not be
    assert all((p >= 0).all() for n, p in module.net.named_parameters() if n.startswith("lins."))
    module.train()
    assert not module.training and not module.net.training

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    d_same, d_diff = module(x, x), module(x, y)
    assert d_same.shape == d_diff.shape == (2,)
    assert torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    assert (d_diff > 0).all()

    # gradients reach the reconstruction through the frozen network
    y.requires_grad_(True)
    loss = perceptual_loss(module, x, y)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lpips_rejects_a_wrong_file(vgg16_state, tmp_path):
    pytest.importorskip("lpips")
    path = tmp_path / "not-vgg.pth"
    torch.save({k: v for k, v in vgg16_state.items() if k != "features.28.weight"}, path)
    with pytest.raises(ValueError, match="features.28.weight"):
        load_lpips(str(path), allow_pickle=True)


def test_lpips_refuses_pickles_that_are_not_allowed_or_not_verified(vgg16_state, tmp_path):
    pytest.importorskip("lpips")
    plain = tmp_path / "vgg16.pth"
    torch.save(vgg16_state, plain)
    with pytest.raises(PickleRefusedError, match="allow_pickle=True"):
        load_lpips(str(plain))
    forged = tmp_path / "vgg16-397923af.pth"  # torchvision's name, other content
    torch.save(vgg16_state, forged)
    with pytest.raises(PickleRefusedError):
        load_lpips(str(forged))
