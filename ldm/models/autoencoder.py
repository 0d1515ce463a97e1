"""What the rest of the code asks of a diffusers ``AutoencoderKL``, and the identity autoencoder.

``IdentityAutoencoder`` (``autoencoder.kind=identity``, f = 1) makes stage 2 a pixel-space diffusion
model (DDPM, Ho et al. 2020): its "latent" is the image itself, in [-1, 1], with scaling factor 1.
It answers the calls stage 2 makes of an ``AutoencoderKL`` (``encode(x).latent_dist``,
``decode(z).sample``, ``config``, ``dtype``, ``device``), so the data, cache, training, samplers and
evaluation run on pixels unchanged. It has no weights; an exported pixel model has no ``vae/``
(``model_index.json`` says ``"vae": [null, null]``), and loading such a folder gives this back.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

AUTOENCODER_KINDS = ("kl", "identity")


class IdentityAutoencoder(ModelMixin, ConfigMixin):
    """E(x) = x, D(z) = z: the autoencoder of a pixel-space model (a downsampling factor of 1)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, channels: int = 3, sample_size: int = 32):
        super().__init__()
        # no weights: an empty buffer carries the module's device and dtype (diffusers reads them from it)
        self.register_buffer("anchor", torch.zeros(0), persistent=False)
        self.register_to_config(
            latent_channels=channels, block_out_channels=[channels], scaling_factor=1.0, shift_factor=None
        )
        self.use_slicing = False
        self.decoder = nn.Identity()  # (what compile_vae compiles; nothing to gain)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput:
        """q(z | x) = a point mass at x: ``mode()``, ``mean`` and ``sample()`` are all x itself."""
        dist = DiagonalGaussianDistribution(torch.cat([x, torch.zeros_like(x)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None) -> DecoderOutput:
        return DecoderOutput(sample=z) if return_dict else (z,)

    def enable_slicing(self) -> None:  # (nothing to slice: decoding is free)
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False


def is_identity(vae: nn.Module | None) -> bool:
    """Whether ``vae`` is the identity autoencoder of a pixel-space model."""
    return isinstance(vae, IdentityAutoencoder)


def downsampling_factor(vae: AutoencoderKL | IdentityAutoencoder) -> int:
    """f = 2 ** (levels - 1): an image side of f * h pixels has h latent pixels (each level but the
    last halves the resolution); 1 for the identity autoencoder."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
