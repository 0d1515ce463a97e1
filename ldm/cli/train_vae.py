"""Command line of stage 1: ``python train_vae.py [--config FILE] [--resume latest|PATH] [--dry-run] [key=value ...]``."""

from __future__ import annotations

import sys

from autoencoder.config import VAERunConfig
from ldm.cli.common import CliParser, dry_run_report, parse_and_load, run_training, user_errors

DEFAULT_PRESET = "vae/shapes.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="train_vae.py", description="Train the KL autoencoder (stage 1).")
    with user_errors(parser):
        cfg, args = parse_and_load(parser, VAERunConfig, DEFAULT_PRESET, argv)
        if args.dry_run:
            from autoencoder.discriminator import NLayerDiscriminator
            from autoencoder.model import build_autoencoder

            models = {
                "autoencoder": build_autoencoder(cfg.model, cfg.data.resolution),
                "discriminator": NLayerDiscriminator(
                    cfg.model.in_channels, cfg.loss.disc_channels, cfg.loss.disc_layers
                ),
            }
            sys.stdout.write(dry_run_report(cfg, models))
            return 0
        from autoencoder.train import train_autoencoder

        return run_training(train_autoencoder, cfg, args.resume)
