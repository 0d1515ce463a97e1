"""Command line of stage 2: ``python train_ldm.py [--config FILE] [--resume latest|PATH] [--dry-run] [key=value ...]``."""

from __future__ import annotations

import sys

from ldm.cli.common import CliParser, dry_run_report, parse_and_load, run_training, user_errors
from ldm.core.errors import MissingFileError
from ldm.models.autoencoder import downsampling_factor
from ldm.train.config import LDMRunConfig

DEFAULT_PRESET = "ldm/shapes.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="train_ldm.py", description="Train the text-conditioned latent UNet (stage 2).")
    with user_errors(parser):
        cfg, args = parse_and_load(parser, LDMRunConfig, DEFAULT_PRESET, argv)
        if args.dry_run:
            sys.stdout.write(dry_run_report(cfg, dry_run_models(cfg)))
            return 0
        from ldm.train.diffusion import train_ldm

        return run_training(train_ldm, cfg, args.resume)


def dry_run_models(cfg: LDMRunConfig) -> dict:
    """The three networks as the run would build them; without the autoencoder, sizes assume f=4."""
    from conditioning import build_text_encoder
    from ldm.models.unet import build_unet
    from ldm.train.models import load_autoencoder

    models = {}
    try:
        vae, _ = load_autoencoder(cfg)
        channels, factor = vae.config.latent_channels, downsampling_factor(vae)
        models["autoencoder (frozen)"] = vae
    except MissingFileError as err:
        sys.stderr.write(f"note: {err}; sizes below assume 4 latent channels and f=4\n")
        channels, factor = 4, 4
    text = build_text_encoder(cfg.text)
    models["text encoder"] = text
    models["unet"] = build_unet(cfg.unet, channels, cfg.data.resolution // factor, text.hidden_size)
    return models
