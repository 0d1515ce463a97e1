"""What the rest of the code asks of a diffusers ``AutoencoderKL``."""

from __future__ import annotations

from diffusers import AutoencoderKL


def downsampling_factor(vae: AutoencoderKL) -> int:
    """f = 2 ** (levels - 1): an image side of f * h pixels has h latent pixels (each level but the
    last halves the resolution)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
