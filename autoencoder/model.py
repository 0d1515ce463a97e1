"""Building the KL autoencoder: a diffusers ``AutoencoderKL`` from our config."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from autoencoder.config import AutoencoderConfig
from ldm.core.errors import MissingFileError
from ldm.core.safe_load import check_model_folder, from_pretrained_kwargs


def build_autoencoder(cfg: AutoencoderConfig, sample_size: int) -> AutoencoderKL:
    """An untrained ``AutoencoderKL``; ``scaling_factor`` is set later, measured on data."""
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=sample_size,
        mid_block_add_attention=cfg.mid_block_attention,
        scaling_factor=1.0,
    )


def load_pretrained_autoencoder(path: str | Path, allow_pickle: bool = False) -> AutoencoderKL:
    """An ``AutoencoderKL`` folder, or a diffusers pipeline folder with one in ``vae/`` (safetensors,
    or pickle weights read with weights_only=True when ``allow_pickle``)."""
    folder = Path(path)
    if (folder / "vae" / "config.json").exists():
        folder = folder / "vae"
    if not (folder / "config.json").exists():
        raise MissingFileError(
            f"pretrained={path}: no AutoencoderKL there (a folder with config.json, or a pipeline folder with vae/)"
        )
    check_model_folder(folder, allow_pickle, "autoencoder")
    return AutoencoderKL.from_pretrained(folder, **from_pretrained_kwargs(allow_pickle))


def trainable_parameters(vae: AutoencoderKL, decoder_only: bool) -> list[torch.nn.Parameter]:
    """All parameters, or with ``decoder_only`` those of post_quant_conv and the decoder; the rest
    (encoder, quant_conv) is frozen, so that the latent space and its scaling factor stay as they are."""
    if not decoder_only:
        return list(vae.parameters())
    vae.requires_grad_(False)
    parts = [vae.decoder] + ([vae.post_quant_conv] if vae.post_quant_conv is not None else [])
    for part in parts:
        part.requires_grad_(True)
    return [p for part in parts for p in part.parameters()]


def decoder_last_layer(vae: AutoencoderKL):
    """The parameter the adaptive GAN weight differentiates against (the decoder's output conv)."""
    return vae.decoder.conv_out.weight


class AutoencoderTrainingForward(torch.nn.Module):
    """x -> (x_rec, posterior mean, posterior logvar), with z ~ q(z | x) in between.

    One ``forward`` for the training step, so that accelerate's DDP and autocast wrappers
    apply (they wrap ``forward`` only, not ``encode`` / ``decode``). ``.vae`` is the model.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``noise`` (B, C, H/f, W/f): the eps of z = mean + std * eps (default: drawn here)."""
        posterior = self.vae.encode(x).latent_dist  # mean, logvar: (B, C, H/f, W/f)
        z = posterior.sample() if noise is None else posterior.mean + posterior.std * noise.to(posterior.mean)
        x_rec = self.vae.decode(z).sample  # (B, 3, H, W)
        return x_rec, posterior.mean, posterior.logvar
