"""Precompute stage 2's latent cache on disk: ``ldm-cache [--config FILE] [key=value ...]``.

The same config as ``train_ldm.py`` (it needs ``cache_dir``); under ``accelerate launch`` every
process encodes and writes its own shards. With the text encoders frozen, their outputs are cached
too (``ldm.data.text_disk_cache``). Training with that config then reads the caches instead of
encoding; a killed run's rerun encodes only the shards it lacks (``ldm.data.disk_cache``).
"""

from __future__ import annotations

import logging
import sys

from ldm.cli.common import CliParser, parse_and_load, setup_logging, user_errors
from ldm.core.errors import ConfigError
from ldm.train.config import LDMRunConfig

DEFAULT_PRESET = "ldm/shapes.yaml"
logger = logging.getLogger("ldm")


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="ldm-cache", description="Write stage 2's latent cache to cache_dir, in shards.")
    with user_errors(parser):
        cfg, _ = parse_and_load(parser, LDMRunConfig, DEFAULT_PRESET, argv)
        if not cfg.cache_dir:
            raise ConfigError("ldm-cache writes the latent cache to disk: set cache_dir=DIR")
        if not cfg.cache_latents:
            raise ConfigError("ldm-cache with cache_latents=false: the run would not read the cache")
        setup_logging()
        import torch
        from accelerate import Accelerator

        from ldm.data import build_dataset
        from ldm.models.autoencoder import downsampling_factor
        from ldm.train import setup
        from ldm.train.data import latent_training_set, text_training_set
        from ldm.train.models import pretrained_folder

        accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
        cfg = pretrained_folder(cfg)
        vae, vae_dir, conditioner, unet = setup.models_on_device(
            cfg, accelerator.device, torch.contiguous_format
        )
        if cfg.data.sources:  # DreamBooth: the class images are drawn first, as train_ldm would
            import dataclasses

            from ldm.diffusion.registry import build_objective
            from ldm.train.models import pretrained_noise
            from ldm.train.sources import ensure_class_images
            from ldm.training.validation import eval_mode

            noise = pretrained_noise(cfg.pretrained, cfg.noise) if cfg.pretrained else cfg.noise
            objective = build_objective(noise)  # the base model's own schedule, as train_ldm draws with
            with eval_mode(unet, *[e.model for e in conditioner.encoders]):
                ensure_class_images(
                    dataclasses.replace(cfg, noise=noise), accelerator,
                    lambda: setup.training_pipeline(vae, conditioner, unet, objective),
                )  # fmt: skip
        images = build_dataset(cfg.data, "train", cfg.seed, bucket_step=8 * downsampling_factor(vae))
        latents = latent_training_set(cfg, accelerator, vae, vae_dir, images)
        if not conditioner.trainable:  # in the dtype training runs them in (cast_frozen)
            setup.cast_frozen(cfg, unet, conditioner, [])
            text_training_set(cfg, accelerator, conditioner, latents)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            items = len(getattr(latents, "base", latents))  # (data.repeats repeats them, not cached twice)
            text = "" if conditioner.trainable else " (and their frozen text conditioning)"
            sys.stdout.write(f"latent cache: {items} items{text} under {cfg.cache_dir}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
