"""Stage 2 with a concept dataset (``data.dataset=sources``): DreamBooth's class images drawn by the
base model, each source's captions, condition dropout and loss weight, and the per-role losses.

Prior preservation (Ruiz et al. 2023, "DreamBooth"): the class images of a regularization source are
what the base model draws for ``class_prompt``; training on them with weight lambda
(``data.prior_loss_weight``) beside the new concept keeps the model drawing its class as before:

    loss = mean_i w_i * ||eps_i - eps_theta(z_t,i, t_i, c_i)||^2,  w_i = lambda for class images, else 1
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object

from ldm.core.errors import DataError
from ldm.data.captions import CaptionConfig, source_caption_configs, transform_caption
from ldm.data.concepts import SOURCE_KEY, SourceView
from ldm.data.folder import image_files
from ldm.train.config import LDMRunConfig
from ldm.train.data import main_process_value

logger = logging.getLogger("ldm")
CLASS_BATCH = 8  # class images per pipeline call


class SourceTerms:
    """Per-source tables for a training step: caption controls, dropout probability and loss weight."""

    def __init__(self, configs: list[CaptionConfig], p_uncond: torch.Tensor, weight: torch.Tensor, prior):
        self.configs, self.p_uncond, self.weight, self.prior = configs, p_uncond, weight, prior
        self.has_prior = bool(prior.any())

    @classmethod
    def of(cls, cfg: LDMRunConfig, device: torch.device) -> SourceTerms:
        sources = cfg.data.sources
        p = [cfg.text.p_uncond if s.caption_dropout is None else s.caption_dropout for s in sources]
        prior = torch.tensor([s.role == "regularization" for s in sources], device=device)
        weight = torch.where(prior, cfg.data.prior_loss_weight, 1.0).float()
        return cls(source_caption_configs(cfg.caption, sources), torch.tensor(p), weight, prior)

    def captions(self, sources: torch.Tensor) -> list[CaptionConfig]:
        """Each item's caption controls (``sources``: (B,) source indices)."""
        return [self.configs[s] for s in sources.tolist()]

    def role_terms(self, losses: torch.Tensor, sources: torch.Tensor) -> dict[str, torch.Tensor]:
        """(sum, count) of the unweighted per-item losses of each role: ``loss_instance``, ``loss_prior``."""
        prior = self.prior[sources]
        return {
            name: torch.stack([losses[rows].sum(), rows.sum().to(losses)])
            for name, rows in (("loss_instance", ~prior), ("loss_prior", prior))
        }


def shown_caption(cfg: LDMRunConfig, per_source: SourceTerms | None):
    """item -> its caption with the prefix and suffix training gives it (its source's, and
    ``caption.*``'s), no tag draws: the words of grid prompts taken from training items."""

    def shown(item: dict) -> str:
        base = per_source.configs[int(item[SOURCE_KEY])] if per_source is not None else cfg.caption
        fixed = dataclasses.replace(base, shuffle_tags=False, tag_dropout=0.0)
        return transform_caption(item["caption"], fixed, None)

    return shown


def missing_class_images(cfg: LDMRunConfig) -> list[tuple[int, int]]:
    """(source index, images to draw) of each regularization source holding fewer than its
    ``num_class_images``."""
    out = []
    for i, s in enumerate(cfg.data.sources):
        if s.role == "regularization" and s.num_class_images:
            have = len(image_files(s.path))
            if have < s.num_class_images:
                out.append((i, s.num_class_images - have))
    return out


@torch.no_grad()
def ensure_class_images(cfg: LDMRunConfig, accelerator, pipeline_of) -> None:
    """Draw the class images that regularization sources lack with the base model (``pipeline_of()``,
    before anything trains), each written whole (a temporary file, then a rename) as
    ``class-NNNNN.png`` with its prompt in ``class-NNNNN.txt``: image n from seed n and prompt n mod
    len(prompts), the free numbers from 0 up. The main process names the missing images; every
    process draws its share (image k on process k mod P). Images already there are kept: a rerun or
    a resume draws nothing more. Every process raises if any one failed, or if the folder still
    lacks images afterwards (it must be on a file system every process sees)."""
    if not any(s.role == "regularization" and s.num_class_images for s in cfg.data.sources):
        return
    plan = main_process_value(
        accelerator,
        [(i, free_names(Path(cfg.data.sources[i].path), count)) for i, count in missing_class_images(cfg)],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    failure = None
    try:
        pipe = pipeline_of() if any(names[rank::world] for _, names in plan) else None
        for index, names in plan:
            source = cfg.data.sources[index]
            prompts = source.prompts()
            if accelerator.is_main_process:
                logger.info(
                    "prior preservation: %s holds %d of %d class images; drawing %d for %s with the base model",
                    source.path, source.num_class_images - len(names), source.num_class_images, len(names),
                    repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} prompts in turn",
                )  # fmt: skip
            t0, mine = time.perf_counter(), names[rank::world]
            Path(source.path).mkdir(parents=True, exist_ok=True)
            for start in range(0, len(mine), CLASS_BATCH):
                chunk = mine[start : start + CLASS_BATCH]
                chunk_prompts = [prompts[n % len(prompts)] for n, _ in chunk]
                with accelerator.autocast():  # mixed precision: drawn in the half dtype, as grids are
                    images = pipe(
                        chunk_prompts,
                        num_inference_steps=cfg.sample.steps,
                        guidance_scale=cfg.sample.guidance_scale,
                        sampler=cfg.sample.sampler,
                        seed=[cfg.seed * 1_000_003 + n for n, _ in chunk],  # image n: the same on every rerun
                        height=cfg.data.resolution,
                        width=cfg.data.resolution,
                        progress=False,
                    ).images
                for (_, stem), image, prompt in zip(chunk, images, chunk_prompts, strict=True):
                    write_class_image(Path(source.path) / stem, image, prompt)
            if accelerator.is_main_process:
                logger.info(
                    "prior preservation: drew %d class images in %.1f s", len(mine), time.perf_counter() - t0
                )
    except Exception as err:  # re-raised on every process below, not left to a collective's timeout
        failure = f"process {rank}: {type(err).__name__}: {err}"
    failures = [f for f in gather_object([failure]) if f]
    if failures:
        raise RuntimeError(f"drawing the class images failed ({'; '.join(failures)})")
    accelerator.wait_for_everyone()
    lacking = [(rank, cfg.data.sources[i].path, n) for i, n in missing_class_images(cfg)]
    lacking = [x for per_process in gather_object([lacking]) for x in per_process]
    if lacking:
        raise DataError(
            "class image folders still lack images after drawing: "
            + ", ".join(f"{path} lacks {n} (process {r})" for r, path, n in lacking)
            + "; every process must see the same folder (a shared file system)"
        )


def free_names(folder: Path, count: int) -> list[tuple[int, str]]:
    """``count`` (number, stem) pairs ``class-NNNNN``, the lowest numbers from 0 whose stem no image
    file has yet (a prompt file left without its image is overwritten)."""
    taken = {p.stem for p in image_files(folder)}
    names, n = [], 0
    while len(names) < count:
        if f"class-{n:05d}" not in taken:
            names.append((n, f"class-{n:05d}"))
        n += 1
    return names


def write_class_image(stem: Path, image, prompt: str) -> None:
    """``stem``.txt (the prompt) then ``stem``.png, each through a temporary file and a rename: an
    interrupted draw leaves no half-written image."""
    for suffix, write in (
        (".txt", lambda p: p.write_text(prompt + "\n")),
        (".png", lambda p: image.save(p, "PNG")),
    ):
        tmp = stem.with_name(f".{stem.name}{suffix}.tmp")
        write(tmp)
        os.replace(tmp, stem.with_suffix(suffix))


def log_sources(cfg: LDMRunConfig, train_set, num_processes: int = 1) -> None:
    """One log line per source: its images, repeats and positions an epoch (and how pairs are made)."""
    if not isinstance(train_set, SourceView):
        return
    counts = train_set.source_counts(len(cfg.data.sources))
    sizes = [len(p) for p in train_set.base.parts]
    for s, n, positions in zip(cfg.data.sources, sizes, counts, strict=True):
        logger.info(
            "data source %s (%s): %d images x %d repeats; %d items an epoch%s",
            s.path, s.role, n, s.repeats, positions,
            f", loss weight {cfg.data.prior_loss_weight:g}" if s.role == "regularization" else "",
        )  # fmt: skip
    if train_set.group == 2:
        batch = cfg.train.batch_size * num_processes  # the items of one micro-step, all processes
        if train_set.bucket_of is not None:
            how = (
                "with aspect-ratio buckets a batch holds one bucket, so class and instance images share a "
                "batch only where they share a bucket (class images are drawn square)"
            )
            logger.warning("prior preservation: %s", how)
        elif batch % 2:
            how = "class and instance images in turn (an odd global batch)"
        else:
            how = "each global batch holds as many class images as instance images"
        logger.info("prior preservation: %d instance/class pairs an epoch; %s", len(train_set) // 2, how)
