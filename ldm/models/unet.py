"""Building the denoiser: a diffusers ``UNet2DConditionModel``, and its attention backend."""

from __future__ import annotations

import importlib.util
import logging

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from ldm.models.config import UNetConfig

logger = logging.getLogger("ldm")


MICRO_CONDITIONS = 6  # SDXL's time ids: original (h, w), crop (top, left), target (h, w)


def build_unet(
    cfg: UNetConfig, latent_channels: int, sample_size: int, cross_attention_dim: int, pooled_dim: int = 0
) -> UNet2DConditionModel:
    """An untrained UNet with cross-attention at the levels ``cfg.cross_attention`` marks (and the middle).

    ``pooled_dim`` > 0: SDXL's added conditioning (``addition_embed_type="text_time"``): the pooled
    text embedding and the 6 time ids, each in a Fourier embedding of ``addition_time_embed_dim``,
    projected and added to the timestep embedding.
    """
    down = tuple("CrossAttnDownBlock2D" if x else "DownBlock2D" for x in cfg.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(cfg.cross_attention))
    extra = {}
    if cfg.transformer_layers_per_block is not None:
        extra["transformer_layers_per_block"] = tuple(cfg.transformer_layers_per_block)
    if pooled_dim:
        extra |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": cfg.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": MICRO_CONDITIONS * cfg.addition_time_embed_dim
            + pooled_dim,
        }
    heads = tuple(cfg.heads_per_level) if cfg.heads_per_level is not None else cfg.attention_head_dim
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        **extra,
    )
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def set_attention_backend(unet: UNet2DConditionModel, backend: str, device: torch.device) -> str:
    """Choose the attention kernels: ``auto`` is xformers when importable on CUDA, else PyTorch SDPA.

    Returns the backend in use. ``xformers`` where it cannot run is an error, not a silent fallback.
    """
    if backend == "auto":
        backend = "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if backend == "xformers":
        if device.type != "cuda" or not xformers_available():
            raise ValueError(
                f"unet.attention=xformers needs CUDA and the xformers package (device is {device.type}); "
                "use unet.attention=auto or sdpa"
            )
        unet.enable_xformers_memory_efficient_attention()
    elif backend == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif backend == "math":
        unet.set_attn_processor(AttnProcessor())
    else:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: auto | sdpa | xformers | math")
    logger.info("attention backend: %s", backend)
    return backend
