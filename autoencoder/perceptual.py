"""Optional LPIPS perceptual loss (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric"), VGG16 variant, built without touching the network.

The `lpips` package ships its small linear heads, but would fetch the VGG16 backbone through
torchvision's downloader. We build it with a random backbone (`pnet_rand=True`, no download) and
load the ImageNet VGG16 weights ourselves from a local torchvision-format file.
"""

import os
import warnings

import torch
from torch import Tensor, nn

from ldm.core.errors import ModelError
from ldm.core.safe_load import load_state_dict

VGG16_FILENAME = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 weights, as its cache names them


def default_vgg16_path() -> str:
    """Where torchvision caches the VGG16 weights: <torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILENAME)


class LPIPSDistance(nn.Module):
    """Frozen LPIPS: two (B, 3, H, W) image batches in [-1, 1] -> (B,) distances.

    Always in eval mode (the lpips linear heads contain dropout), even inside a parent's .train().
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "LPIPSDistance":
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(x, y).flatten()  # (B, 1, 1, 1) -> (B,)


def load_lpips(
    backbone_weights: str | None = None, allow_pickle: bool = False
) -> tuple[nn.Module | None, str]:
    """Build the frozen LPIPS-VGG module, or say in one line why LPIPS is off.

    backbone_weights: a torchvision VGG16 state dict in .safetensors, or torchvision's own
    download (``vgg16-397923af.pth``, checked against the hash in its name), or with
    ``allow_pickle`` any torch file, read with weights_only=True (``ldm.core.safe_load``); by default
    torchvision's cache file, when it exists. Returns (module, message) or (None, message); never
    downloads anything.
    """
    try:
        import lpips
    except ImportError:
        return (
            None,
            "LPIPS perceptual loss is off: the lpips package is not installed; run pip install 'ldm[lpips]'",
        )

    path = backbone_weights if backbone_weights is not None else default_vgg16_path()
    if not os.path.isfile(path):
        return None, (
            f"LPIPS perceptual loss is off: no VGG16 backbone weights at {path}; "
            f"put {VGG16_FILENAME} in {os.path.dirname(default_vgg16_path())} or set loss.lpips_weights=PATH"
        )

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        # pretrained=True: the packaged linear heads (a local file); pnet_rand=True: random backbone, no download
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    _load_vgg16_backbone(net.net, load_state_dict(path, allow_pickle), path)
    return LPIPSDistance(net), f"LPIPS perceptual loss is on (VGG16 backbone from {path})"


def perceptual_loss(module: nn.Module, x: Tensor, x_rec: Tensor) -> Tensor:
    """Mean LPIPS distance between x and x_rec, both (B, 3, H, W) in [-1, 1]."""
    return module(x, x_rec).mean()


def _load_vgg16_backbone(backbone: nn.Module, state: dict[str, Tensor], path: str) -> None:
    """Copy torchvision `features.{i}.{weight,bias}` into lpips' `slice{k}.{i}.{weight,bias}`.

    lpips' vgg16 splits torchvision's `features` Sequential into slices 1..5 at indices
    [0, 4), [4, 9), [9, 16), [16, 23), [23, 30) and keeps each layer's original index as its name,
    so the torchvision key is the lpips key with the `sliceK.` prefix replaced by `features.`.
    Classifier weights in the file are ignored.
    """
    own = backbone.state_dict()  # slice1.0.weight, ..., slice5.28.bias
    mapped, missing = {}, []
    for key, param in own.items():
        src = "features." + key.split(".", 1)[1]
        if src not in state:
            missing.append(src)
        elif state[src].shape != param.shape:
            raise ModelError(
                f"{path} is not a torchvision VGG16 state dict: {src} has shape "
                f"{tuple(state[src].shape)}, expected {tuple(param.shape)}"
            )
        else:
            mapped[key] = state[src]
    if missing:
        raise ModelError(
            f"{path} is not a torchvision VGG16 state dict: missing {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}"
        )
    backbone.load_state_dict(mapped, strict=True)
