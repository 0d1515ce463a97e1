"""Stage 1's models before training: the autoencoder, the discriminator, the perceptual loss."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from autoencoder.config import VAERunConfig
from autoencoder.discriminator import NLayerDiscriminator
from autoencoder.model import build_autoencoder, load_pretrained_autoencoder
from autoencoder.perceptual import load_lpips
from ldm.core.errors import ConfigError, MissingFileError
from ldm.models.autoencoder import downsampling_factor
from ldm.training.compile import compiled_for_training

logger = logging.getLogger("ldm")


def autoencoder_to_train(cfg: VAERunConfig, memory_format: torch.memory_format) -> AutoencoderKL:
    """The pretrained autoencoder (``cfg.pretrained``) or a new one, checked against the resolution."""
    if cfg.pretrained:
        vae = load_pretrained_autoencoder(cfg.pretrained, cfg.allow_pickle)
    else:
        vae = build_autoencoder(cfg.model, cfg.data.resolution)
    factor = downsampling_factor(vae)
    if cfg.data.resolution % factor:  # a pretrained model's factor is known only now
        raise ConfigError(
            f"config key 'data.resolution' is {cfg.data.resolution}; it must be a multiple of the "
            f"downsampling factor {factor} of the autoencoder at pretrained={cfg.pretrained}"
        )
    return vae.to(memory_format=memory_format)


def discriminator(
    cfg: VAERunConfig, accelerator: Accelerator, in_channels: int, memory_format: torch.memory_format
) -> NLayerDiscriminator:
    """The PatchGAN discriminator; batch norm synchronised across processes where PyTorch can."""
    disc = NLayerDiscriminator(in_channels, cfg.loss.disc_channels, cfg.loss.disc_layers, cfg.loss.disc_norm)
    if accelerator.num_processes > 1 and cfg.loss.disc_norm == "batch":
        if accelerator.device.type in ("cuda", "xpu"):  # batch statistics of the global batch
            disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
        else:
            logger.warning(
                "loss.disc_norm=batch on %d CPU processes: PyTorch has no SyncBatchNorm on the CPU, so the "
                "discriminator normalises with each process's own batch; set loss.disc_norm=group for "
                "results that do not depend on the process count",
                accelerator.num_processes,
            )
    return disc.to(memory_format=memory_format)


def perceptual_loss(
    cfg: VAERunConfig, device: torch.device, for_metric: bool = False
) -> torch.nn.Module | None:
    """LPIPS when its weights are present (``loss.lpips_weights``) and it is in the loss (or
    ``for_metric``); None otherwise, with a log line saying why."""
    if cfg.loss.lpips_weights and not Path(cfg.loss.lpips_weights).is_file():
        raise MissingFileError(
            f"loss.lpips_weights={cfg.loss.lpips_weights}: no such file (a VGG16 state dict)"
        )
    if cfg.loss.perceptual_weight <= 0 and not for_metric:
        return None
    lpips, message = load_lpips(cfg.loss.lpips_weights, cfg.allow_pickle)
    if not for_metric:
        logger.info(message)
    return lpips.to(device) if lpips is not None else None


def compiled_until_gan(model: torch.nn.Module, cfg: VAERunConfig, device: torch.device) -> torch.nn.Module:
    """``train.compile``: E and D compiled for the loss until the GAN starts. From ``loss.disc_start``
    the adaptive weight's retain_graph would run a compiled graph's whole backward twice (measured
    0.55x the eager step), so those steps run eagerly."""
    if cfg.train.compile and cfg.loss.disc_start < cfg.train.max_steps:
        logger.info("train.compile: steps from loss.disc_start=%d (the GAN) run eagerly", cfg.loss.disc_start)
    return compiled_for_training(model, cfg.train.compile and cfg.loss.disc_start > 0, device)
