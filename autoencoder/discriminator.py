"""PatchGAN discriminator (Isola et al. 2017, pix2pix), in the configuration Taming Transformers uses.

Each output logit judges one overlapping patch of the input as real or reconstructed. With n_layers
strided blocks the receptive field is 70 px for n_layers=3 and 34 px for n_layers=2.

Norms (``NORMS``): ``batch`` as in pix2pix and Taming Transformers (on several GPUs the trainer
makes it a ``SyncBatchNorm``, so that the statistics are the global batch's), ``group`` (GroupNorm,
independent of the batch: the same on any number of processes, CPUs included) or ``none``.
"""

import math

import torch
from torch import Tensor, nn

KERNEL = 4  # 4x4 convolutions throughout (pix2pix, appendix 6.1.2)
PADDING = 1
LEAKY_SLOPE = 0.2
MAX_CHANNEL_MULT = 8  # channels double per block up to 8 * channels
NORMS = ("batch", "group", "none")
MAX_GROUPS = 32


def _block(c_in: int, c_out: int, stride: int, norm: str) -> list[nn.Module]:
    """Conv4x4 -> [norm] -> LeakyReLU(0.2); the conv has no bias when a norm follows it."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, KERNEL, stride=stride, padding=PADDING, bias=norm == "none")
    ]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(c_out))
    elif norm == "group":
        layers.append(nn.GroupNorm(math.gcd(MAX_GROUPS, c_out), c_out))
    layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
    return layers


class NLayerDiscriminator(nn.Module):
    """(B, in_channels, H, W) images -> (B, 1, h, w) real/fake logits, one per patch.

    Layout: C64 (stride 2, no norm) -> n_layers-1 blocks C128, C256, ... (stride 2, BatchNorm)
    -> one block at stride 1 -> conv to 1 channel at stride 1. For H = 32: n_layers=2 gives 6x6,
    n_layers=3 gives 2x2.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r}; allowed: {' | '.join(NORMS)}")
        mults = [min(2**i, MAX_CHANNEL_MULT) for i in range(n_layers + 1)]  # 1, 2, 4, 8, 8, ...
        layers = _block(in_channels, channels, stride=2, norm="none")
        for i in range(1, n_layers):
            layers += _block(channels * mults[i - 1], channels * mults[i], stride=2, norm=norm)
        layers += _block(channels * mults[n_layers - 1], channels * mults[n_layers], stride=1, norm=norm)
        layers.append(nn.Conv2d(channels * mults[n_layers], 1, KERNEL, stride=1, padding=PADDING))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)  # (B, 1, h, w)


@torch.no_grad()
def _init_weights(module: nn.Module) -> None:
    """DCGAN / pix2pix init: conv weights ~ N(0, 0.02); norm scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
