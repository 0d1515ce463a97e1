"""Exporting stage 2 as a diffusers ``StableDiffusionPipeline`` (SDXL: ``StableDiffusionXLPipeline``) folder."""

from __future__ import annotations

import logging
from pathlib import Path

from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

logger = logging.getLogger("ldm")


def export_pipeline(pipe: LatentDiffusionPipeline, folder: Path) -> Path:
    """Save vae/, unet/, text_encoder/, tokenizer/, scheduler/ and model_index.json, atomically.

    ``diffusers.StableDiffusionPipeline.from_pretrained(folder)`` loads the result as it is, and
    ``LatentDiffusionPipeline.from_pretrained(folder)`` gives back the same images.
    """
    pipe.save_pretrained(folder)
    kind = "StableDiffusionXLPipeline" if pipe.is_sdxl else "StableDiffusionPipeline"
    logger.info("exported %s folder to %s", kind, folder)
    return Path(folder)
