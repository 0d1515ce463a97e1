"""Stage 2's evaluation: the sample-grid prompts, caption accuracy at one guidance scale, and the
end-of-run evaluation and report (``ldm.eval``).

Caption accuracy: the share of generated images whose color, shape and background, read
from the pixels by ``ldm.eval.shapes_reader``, all match the prompt.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset

from ldm.core.errors import ConfigError
from ldm.core.images import save_grid
from ldm.eval.pipeline_eval import PipelineEvalSettings, evaluate_pipeline
from ldm.eval.report import pipeline_report
from ldm.eval.shapes_reader import caption_accuracy
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.prompts import read_prompt_file
from ldm.train.config import LDMRunConfig
from ldm.training.validation import ema_weights, eval_mode

logger = logging.getLogger("ldm")


TRAIN_PROMPT_ITEMS = 256  # training items looked through for grid prompts when nothing is held out


def grid_prompts(
    cfg: LDMRunConfig, val_set: Dataset, train_set: Dataset | None = None, shown=None
) -> list[str]:
    """The prompts of the periodic sample grids: configured, else the first distinct validation
    captions, else (nothing held out: ``data.val_size=0``) the first distinct captions of the first
    training items, as ``shown(item)`` gives them (with their trigger words)."""
    if cfg.sample.prompts_file:
        return [line.prompt for line in read_prompt_file(cfg.sample.prompts_file)]
    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    prompts: list[str] = []
    for dataset, caption_of in ((val_set, None), (train_set, shown)):
        if dataset is None or prompts or isinstance(dataset, IterableDataset):  # (a stream: not looked at)
            continue
        for i in range(min(len(dataset), TRAIN_PROMPT_ITEMS if caption_of else len(dataset))):
            item = dataset[i]
            caption = caption_of(item) if caption_of else item["caption"]
            if caption and caption not in prompts:
                prompts.append(caption)
            if len(prompts) == cfg.sample.grid_prompts:
                break
    if not prompts:
        raise ConfigError(
            "no prompts for the sample grids and the evaluation: the captions are empty; set "
            "sample.prompts=['...'] (or sample.prompts_file)"
        )
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
            output_type="pt_signed",
            progress=False,
        )
        images.append(out.images)
    return caption_accuracy(torch.cat(images), captions)


def eval_settings(cfg: LDMRunConfig, allow_pickle: bool | None = None) -> PipelineEvalSettings:
    """The ``ldm.eval`` settings of a run config."""
    e = cfg.eval
    return PipelineEvalSettings(
        num_samples=e.num_samples,
        seeds_per_prompt=e.seeds_per_prompt,
        batch_size=e.batch_size,
        guidance_scales=list(e.guidance_scales),
        guidance_scale=cfg.sample.guidance_scale,
        sampler=cfg.sample.sampler,
        steps=cfg.sample.steps,
        bound_samples=e.bound_samples,
        bound_strata=e.bound_strata,
        timestep_points=e.timestep_points,
        shapes=cfg.data.dataset == "shapes",
        inception_weights=e.inception_weights,
        fid_reference=e.fid_reference,
        clip_model=e.clip_model,
        allow_pickle=cfg.allow_pickle if allow_pickle is None else allow_pickle,
    )


def evaluate_run(
    pipe: LatentDiffusionPipeline, val_set: Dataset, cfg: LDMRunConfig, out: Path, run: Path | None = None
) -> dict:
    """Evaluate the final pipeline on the validation set and write ``out/report.md`` (with the loss
    curves and samples of the run folder ``run``, default ``out``); returns the figures."""
    if cfg.eval.num_samples == 0:
        logger.info("evaluation skipped: eval.num_samples=0")
        return {}
    if len(val_set) == 0:
        logger.info(
            "evaluation skipped: no held-out items (data.val_size=0); measure the model with ldm-eval "
            "on data it did not train on"
        )
        return {}
    t0 = time.perf_counter()
    results, sweep_images = evaluate_pipeline(pipe, val_set, eval_settings(cfg))
    report = pipeline_report(out, results, sweep_images, f"Report: {(run or out).name}", run)
    results["eval_seconds"] = round(time.perf_counter() - t0, 1)
    logger.info("wrote %s (evaluation took %.0f s)", report, results["eval_seconds"])
    return results


def _prompt_file_images(pipe, cfg: LDMRunConfig) -> torch.Tensor:
    """A row of ``sample.grid_seeds`` images per line of ``sample.prompts_file``, each line with its own
    options (the ``sample`` settings where it gives none); rows of other sizes padded to the largest."""
    rows = []
    for line in read_prompt_file(cfg.sample.prompts_file):
        rows.append(
            pipe(
                line.prompt,
                negative_prompt=line.negative_prompt,
                num_images_per_prompt=cfg.sample.grid_seeds,
                num_inference_steps=line.steps or cfg.sample.steps,
                guidance_scale=cfg.sample.guidance_scale
                if line.guidance_scale is None
                else line.guidance_scale,
                sampler=cfg.sample.sampler,
                seed=cfg.seed if line.seed is None else line.seed,
                width=line.width,
                height=line.height,
                output_type="pt_signed",
                progress=False,
            ).images
        )  # (grid_seeds, 3, h_i, w_i)
    height, width = max(r.shape[-2] for r in rows), max(r.shape[-1] for r in rows)
    padded = [
        torch.nn.functional.pad(r, (0, width - r.shape[-1], 0, height - r.shape[-2]), value=-1.0)
        for r in rows
    ]
    return torch.cat(padded)


@torch.no_grad()
def save_prompt_grid(pipe, prompts: list[str], cfg: LDMRunConfig, path: Path, ema=None, params=None) -> None:
    """A grid of fixed prompts (rows) x fixed seeds (columns), with EMA weights when EMA is on."""
    with ema_weights(ema, params), eval_mode(pipe.unet, *pipe.text_encoders):
        if cfg.sample.prompts_file:
            images = _prompt_file_images(pipe, cfg)
        else:
            images = pipe(
                prompts,
                num_images_per_prompt=cfg.sample.grid_seeds,
                num_inference_steps=cfg.sample.steps,
                guidance_scale=cfg.sample.guidance_scale,
                sampler=cfg.sample.sampler,
                seed=cfg.seed,
                output_type="pt_signed",
                progress=False,
            ).images
        save_grid(images, path, nrow=cfg.sample.grid_seeds)
