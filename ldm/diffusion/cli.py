"""Command line of stage 2: ``python train_ldm.py [--config FILE] [--resume latest|PATH] [--dry-run] [key=value ...]``."""

from __future__ import annotations

import sys

from ldm.cli_common import CliParser, dry_run_report, parse_and_load, run_training, user_errors
from ldm.diffusion.config import LDMRunConfig
from ldm.errors import MissingFileError

DEFAULT_PRESET = "ldm/shapes.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="train_ldm.py", description="Train the text-conditioned latent UNet (stage 2).")
    with user_errors(parser):
        cfg, args = parse_and_load(parser, LDMRunConfig, DEFAULT_PRESET, argv)
        if args.dry_run:
            sys.stdout.write(dry_run_report(cfg, dry_run_models(cfg)))
            return 0
        from ldm.diffusion.train import train_ldm

        return run_training(train_ldm, cfg, args.resume)


def dry_run_models(cfg: LDMRunConfig) -> dict:
    """The three networks as the run would build them; without the autoencoder, sizes assume f=4."""
    from conditioning import build_text_encoder
    from ldm.diffusion.models import load_autoencoder
    from ldm.diffusion.unet import build_unet

    models = {}
    try:
        vae, _ = load_autoencoder(cfg)
        channels, factor = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
        models["autoencoder (frozen)"] = vae
    except MissingFileError as err:
        sys.stderr.write(f"note: {err}; sizes below assume 4 latent channels and f=4\n")
        channels, factor = 4, 4
    text = build_text_encoder(cfg.text)
    models["text encoder"] = text
    models["unet"] = build_unet(cfg.unet, channels, cfg.data.resolution // factor, text.hidden_size)
    return models
