"""Tests run on the CPU, offline, with tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_autoencoder(scaling_factor: float):
    """A tiny untrained f=2 AutoencoderKL (8 channels, 16 px), built as stage 1 builds its model."""
    import torch

    from autoencoder.config import AutoencoderConfig
    from autoencoder.model import build_autoencoder

    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderConfig(block_out_channels=[8, 8], norm_num_groups=4), sample_size=16)
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae
