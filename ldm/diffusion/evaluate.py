"""Evaluating a text-to-image pipeline on the shapes validation captions: caption accuracy.

Caption accuracy: the share of generated images whose color, shape and background, read
from the pixels by ``ldm.shapes_eval``, all match the prompt.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from ldm.diffusion.config import LDMRunConfig
from ldm.pipeline import LatentDiffusionPipeline
from ldm.shapes_eval import caption_accuracy

logger = logging.getLogger("ldm")


def grid_prompts(cfg: LDMRunConfig, val_set: Dataset) -> list[str]:
    """The prompts of the periodic sample grids: configured, else the first distinct validation captions."""
    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    prompts: list[str] = []
    for i in range(len(val_set)):
        caption = val_set[i]["caption"]
        if caption and caption not in prompts:
            prompts.append(caption)
        if len(prompts) == cfg.sample.grid_prompts:
            break
    return prompts


@torch.no_grad()
def sample_accuracy(
    pipe: LatentDiffusionPipeline, captions: list[str], guidance_scale: float, cfg: LDMRunConfig
) -> dict[str, float]:
    """Generate one image per caption (seeds 0..n-1) and score it."""
    images = []
    bs = cfg.eval.batch_size
    for start in range(0, len(captions), bs):
        chunk = captions[start : start + bs]
        out = pipe(
            chunk,
            num_inference_steps=cfg.sample.steps,
            guidance_scale=guidance_scale,
            sampler=cfg.sample.sampler,
            seed=list(range(start, start + len(chunk))),
            output_type="pt",
            progress=False,
        )
        images.append(out.images)
    return caption_accuracy(torch.cat(images), captions)


def evaluate_pipeline(pipe: LatentDiffusionPipeline, val_set: Dataset, cfg: LDMRunConfig) -> dict:
    """Caption accuracy at guidance 1 and at the configured guidance (shapes data only)."""
    if cfg.data.dataset != "shapes":
        logger.info(
            "caption accuracy skipped: it reads shapes images only (data.dataset=%s)", cfg.data.dataset
        )
        return {}
    n = min(cfg.eval.num_samples, len(val_set))
    if n == 0:
        return {}
    captions = [val_set[i]["caption"] for i in range(n)]
    results = {"num_samples": n, "sampler": cfg.sample.sampler, "steps": cfg.sample.steps}
    for scale in dict.fromkeys([1.0, cfg.sample.guidance_scale]):
        scores = sample_accuracy(pipe, captions, scale, cfg)
        results[f"guidance_{scale:g}"] = scores
        logger.info("caption accuracy at guidance %g: %.3f", scale, scores["accuracy"])
    return results
