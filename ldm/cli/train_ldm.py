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
            models, memory = dry_run_models(cfg)
            sys.stdout.write(dry_run_report(cfg, models) + "\n".join(memory.lines()) + "\n")
            return 0
        from ldm.train.diffusion import train_ldm

        return run_training(train_ldm, cfg, args.resume)


def dry_run_models(cfg: LDMRunConfig):
    """The networks as the run would build them, on the meta device (shapes only: seconds and no
    memory, even for SDXL; a pretrained folder needs only its config files), and the memory estimate
    (``ldm.train.memory_estimate``). Without an autoencoder, sizes assume 4 latent channels and f=8."""
    import dataclasses
    from pathlib import Path

    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from conditioning.new_tokens import add_new_tokens
    from ldm.pipelines.folder import is_pixel_folder
    from ldm.pipelines.single_file import SINGLE_FILE_SUFFIXES, config_folder
    from ldm.train import memory_estimate as mem
    from ldm.train.models import DEFAULT_VAE, make_conditioner
    from ldm.train.setup import trainable_parameters

    if cfg.pretrained and Path(cfg.pretrained).suffix in SINGLE_FILE_SUFFIXES:  # its configs, no weights
        with config_folder(Path(cfg.pretrained), cfg.pretrained_config) as folder:
            if folder is None:
                raise MissingFileError(
                    f"--dry-run with the single file {cfg.pretrained} needs its configs: "
                    "set pretrained_config=FOLDER (a diffusers folder of the same architecture)"
                )
            return dry_run_models(dataclasses.replace(cfg, pretrained=folder, pretrained_config=None))

    vae_dir = (
        Path(cfg.vae) if cfg.vae else (Path(cfg.pretrained) / "vae" if cfg.pretrained else Path(DEFAULT_VAE))
    )
    pixel = cfg.autoencoder.kind == "identity" or bool(cfg.pretrained and is_pixel_folder(cfg.pretrained))
    with init_empty_weights():
        models = {}
        if pixel:  # the identity autoencoder: the UNet diffuses the 3 image channels
            channels, factor = 3, 1
        elif (vae_dir / "config.json").exists():
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(vae_dir))
            channels, factor = vae.config.latent_channels, downsampling_factor(vae)
            models["autoencoder"] = vae
        else:
            sys.stderr.write(
                f"note: no autoencoder config at {vae_dir}; sizes assume 4 latent channels and f=8\n"
            )
            channels, factor = 4, 8
        encoders, unet = _meta_networks(cfg, channels, factor)
    for e in encoders:  # textual inversion: the new tokens' rows are what trains
        if cfg.ti.tokens:
            add_new_tokens(e.model, e.tokenizer, cfg.ti.tokens, cfg.ti.init, cfg.ti.vectors)
    conditioner = make_conditioner(cfg, encoders)
    for i, e in enumerate(encoders):
        models[f"text encoder {i + 1} ({'trained' if e.trainable else 'frozen'})"] = e
    models["unet"] = unet
    if cfg.unet.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = trainable_parameters(cfg, unet, conditioner)
    half = mem.HALF.get(cfg.train.mixed_precision, torch.float32)
    side = cfg.data.resolution // factor
    added = {"text_embeds": conditioner.pooled_size, "time_ids": 6} if conditioner.micro_conditioning else {}
    context = (encoders[0].max_length, conditioner.hidden_size)
    activations = mem.unet_activation_bytes(unet.to(half), (channels, side, side), context, added, half)
    estimate = mem.estimate(
        models,
        trainable,
        half,
        cfg.train.optimizer,
        activations,
        cfg.train.batch_size,
        cfg.train.ema_decay > 0,
    )
    return models, estimate


def _meta_networks(cfg: LDMRunConfig, channels: int, factor: int):
    """(text encoders, UNet) from the run's config or the pretrained folder's config files."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conditioning import TextEncoder, build_clip_tokenizer
    from ldm.models.unet import build_unet
    from ldm.train.models import build_text_encoders, is_sdxl_run, make_conditioner

    if cfg.pretrained:
        root = Path(cfg.pretrained)
        if not (root / "unet" / "config.json").exists():
            raise MissingFileError(
                f"no {root / 'unet' / 'config.json'}: --dry-run reads the pretrained folder's configs"
            )
        kinds = [("text_encoder", CLIPTextModel)] + (
            [("text_encoder_2", CLIPTextModelWithProjection)] if is_sdxl_run(cfg) else []
        )
        configs = [(CLIPTextConfig.from_pretrained(root / sub), cls) for sub, cls in kinds]
        length = [min(77, conf.max_position_embeddings) for conf, _ in configs]  # the tokenizer's length
        encoders = [
            TextEncoder(cls(conf), build_clip_tokenizer(n), n, bool(cfg.text.train))
            for (conf, cls), n in zip(configs, length, strict=True)
        ]
        return encoders, UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
    encoders = build_text_encoders(cfg)
    conditioner = make_conditioner(cfg, encoders)
    unet = build_unet(
        cfg.unet, channels, cfg.data.resolution // factor, conditioner.hidden_size, conditioner.pooled_size
    )
    return encoders, unet
