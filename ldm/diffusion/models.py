"""The three networks of stage 2: the frozen autoencoder, the text encoder and the UNet.

Fresh: the stage-1 export at ``vae``, a text encoder from ``text``, a UNet from ``unet``.
From ``pretrained`` (a diffusers Stable Diffusion folder, ours or SD 1.x/2.x): its vae/,
text_encoder/ + tokenizer/ and unet/.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTokenizer

from conditioning import TextEncoder, build_text_encoder
from ldm.diffusion.config import BETA_SCHEDULES, PREDICTION_TYPES, LDMRunConfig, NoiseConfig
from ldm.diffusion.unet import build_unet
from ldm.pipeline import check_pipeline_folder
from ldm.safe_load import check_model_folder, from_pretrained_kwargs

PIPELINE_PARTS = ("vae", "unet", "text_encoder", "tokenizer")
logger = logging.getLogger("ldm")


def pretrained_noise(pretrained: str | Path, noise: NoiseConfig) -> NoiseConfig:
    """``noise`` with the schedule and prediction type of ``pretrained``/scheduler: fine-tuning keeps
    the process the UNet learned (SD 1.x: scaled_linear epsilon; SD 2.x 768: v_prediction)."""
    from diffusers import DDPMScheduler

    folder = Path(pretrained) / "scheduler"
    if not (folder / "scheduler_config.json").exists():
        raise FileNotFoundError(f"pretrained={pretrained} has no scheduler/scheduler_config.json")
    sc = DDPMScheduler.load_config(folder)
    schedule, prediction = sc.get("beta_schedule", "linear"), sc.get("prediction_type", "epsilon")
    if schedule not in BETA_SCHEDULES or prediction not in PREDICTION_TYPES:
        raise ValueError(
            f"{folder}: beta_schedule {schedule!r} / prediction_type {prediction!r} not supported "
            f"(beta schedules: {', '.join(BETA_SCHEDULES)}; predictions: {', '.join(PREDICTION_TYPES)})"
        )
    adopted = dataclasses.replace(
        noise,
        num_train_timesteps=sc.get("num_train_timesteps", 1000),
        beta_schedule=schedule,
        beta_start=sc.get("beta_start", noise.beta_start),
        beta_end=sc.get("beta_end", noise.beta_end),
        zero_terminal_snr=bool(sc.get("rescale_betas_zero_snr", False)),
        prediction_type=prediction,
    )
    logger.info(
        "noise schedule from %s: %s, %d steps, beta %.5f..%.5f, predicts %s",
        folder, schedule, adopted.num_train_timesteps, adopted.beta_start, adopted.beta_end, prediction,
    )  # fmt: skip
    return adopted


def load_autoencoder(cfg: LDMRunConfig) -> tuple[AutoencoderKL, Path]:
    """The frozen autoencoder: ``pretrained``/vae when set, else the stage-1 export at ``vae``."""
    folder = Path(cfg.pretrained) / "vae" if cfg.pretrained else Path(cfg.vae)
    if not (folder / "config.json").exists():
        if cfg.pretrained:
            raise FileNotFoundError(f"pretrained={cfg.pretrained} has no vae/ folder with a config.json")
        raise FileNotFoundError(f"no autoencoder at {folder}: run python train_vae.py first, or set vae=PATH")
    check_model_folder(folder, cfg.allow_pickle, "autoencoder")
    return AutoencoderKL.from_pretrained(folder, **from_pretrained_kwargs(cfg.allow_pickle)), folder


def build_models(cfg: LDMRunConfig) -> tuple[AutoencoderKL, Path, TextEncoder, UNet2DConditionModel]:
    """(autoencoder, its folder, text encoder, UNet), checked to fit together."""
    if cfg.pretrained:
        check_pipeline_folder(cfg.pretrained, PIPELINE_PARTS)
        check_model_folder(Path(cfg.pretrained) / "unet", cfg.allow_pickle, "UNet")
    vae, vae_dir = load_autoencoder(cfg)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.data.resolution % factor:
        raise ValueError(
            f"data.resolution={cfg.data.resolution} is not a multiple of the autoencoder's factor {factor}"
        )
    if cfg.pretrained:
        # the pipeline's own text encoder as it is: its context length, its last layer
        max_length = CLIPTokenizer.from_pretrained(Path(cfg.pretrained) / "tokenizer").model_max_length
        text_cfg = dataclasses.replace(
            cfg.text,
            kind="clip",
            name_or_path=cfg.pretrained,
            pretrained=None,
            layer="last",
            max_length=max_length,
        )
        text_encoder = build_text_encoder(text_cfg, cfg.allow_pickle)
        unet = UNet2DConditionModel.from_pretrained(
            Path(cfg.pretrained) / "unet", **from_pretrained_kwargs(cfg.allow_pickle)
        )
        if cfg.unet.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
    else:
        text_encoder = build_text_encoder(cfg.text, cfg.allow_pickle)
        unet = build_unet(
            cfg.unet, vae.config.latent_channels, cfg.data.resolution // factor, text_encoder.hidden_size
        )
    check_compatible(vae, text_encoder, unet)
    return vae, vae_dir, text_encoder, unet


def check_compatible(vae: AutoencoderKL, text_encoder: TextEncoder, unet: UNet2DConditionModel) -> None:
    """Latent channels and context width must agree, with a message that says which and what to do."""
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(
            f"the autoencoder has {vae.config.latent_channels} latent channels but the UNet takes "
            f"{unet.config.in_channels}: use an autoencoder with {unet.config.in_channels} latent channels "
            "(vae=PATH) or a UNet built for this one"
        )
    if unet.config.cross_attention_dim != text_encoder.hidden_size:
        raise ValueError(
            f"the text encoder gives {text_encoder.hidden_size}-wide contexts but the UNet's cross_attention_dim "
            f"is {unet.config.cross_attention_dim}"
        )
