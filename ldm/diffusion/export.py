"""Loading the stage-1 autoencoder, and exporting stage 2 as a diffusers ``StableDiffusionPipeline`` folder."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from diffusers import DDIMScheduler, StableDiffusionPipeline

from ldm.diffusion.config import LDMRunConfig
from ldm.diffusion.noise import training_scheduler
from ldm.io import replace_dir
from ldm.pipeline import LatentDiffusionPipeline

logger = logging.getLogger("ldm")


def export_scheduler(cfg: LDMRunConfig) -> DDIMScheduler:
    """The scheduler saved with the pipeline: DDIM on the training schedule, ``clip_sample`` off."""
    return DDIMScheduler.from_config(
        training_scheduler(cfg.noise).config, clip_sample=False, set_alpha_to_one=False
    )


def export_pipeline(pipe: LatentDiffusionPipeline, folder: Path, cfg: LDMRunConfig) -> Path:
    """Save vae/, unet/, text_encoder/, tokenizer/, scheduler/ and model_index.json, atomically.

    ``diffusers.StableDiffusionPipeline.from_pretrained(folder)`` loads the result as it is.
    """
    folder = Path(folder)
    sd = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=export_scheduler(cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sd.save_pretrained(tmp, safe_serialization=True)
    replace_dir(tmp, folder)
    logger.info("exported StableDiffusionPipeline folder to %s", folder)
    return folder
