"""Evaluating a text-to-image pipeline on held-out images and captions.

- The guidance sweep: for each scale, P distinct held-out captions x K seeds are sampled; on
  shapes data, caption accuracy (``ldm.eval.shapes_reader``); always, diversity (mean RMS pixel
  distance between the K images of a caption); CLIP score when a CLIP model is given.
- FID and KID of the samples at the configured guidance against the held-out images, when
  Inception weights are given.
- On held-out latents (the autoencoder's posterior mean, scaled): the denoising loss per
  timestep and the variational bound in bits per dimension (``ldm.eval.bound``). A pixel-space
  model's bound uses DDPM's discretized decoder (a true NLL of the 8-bit images), and its
  rate-distortion curve (DDPM's progressive lossy compression) is reported too.
Each metric whose weights are missing says so in one line and is left out.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from ldm.data.batches import item_batches
from ldm.diffusion.ddpm import DDPM
from ldm.eval.bound import rate_distortion, variational_bound
from ldm.eval.quality import pairwise_diversity
from ldm.eval.shapes_reader import caption_accuracy
from ldm.eval.timestep_loss import loss_per_timestep
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

logger = logging.getLogger("ldm")


@dataclass
class PipelineEvalSettings:
    """What to measure; ``LDMEvalConfig`` and ``ldm-eval`` fill it."""

    num_samples: int = 324  # images per guidance scale: prompts x seeds_per_prompt
    seeds_per_prompt: int = 6  # images per distinct caption (diversity needs 2 or more)
    batch_size: int = 108
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    guidance_scale: float = 4.0  # the model's working scale: FID/KID/CLIP samples
    sampler: str = "dpm++2m"
    steps: int = 20
    bound_samples: int = 128  # held-out latents for the bound and the loss per timestep
    bound_strata: int = 50  # timesteps sampled for the bound's sum (one per stratum)
    timestep_points: int = 20
    shapes: bool = True  # caption accuracy needs shapes images
    inception_weights: str | None = None
    fid_reference: str | None = None  # a folder of reference images for FID/KID; None: the held-out images
    clip_model: str | None = None
    allow_pickle: bool = False


def held_out(dataset: Dataset, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` items: images (n, 3, H, W) in [-1, 1] and captions."""
    images, captions = [], []
    for items in item_batches(dataset, min(n, len(dataset)), 64):
        images.append(torch.stack([item["pixel_values"] for item in items]))
        captions += [item["caption"] for item in items]
    return torch.cat(images), captions


def sweep_prompts(
    captions: list[str], num_samples: int, seeds_per_prompt: int
) -> tuple[list[str], list[int]]:
    """P distinct captions (in order of appearance), each K times, with seeds 0..K-1: (prompts, seeds)."""
    distinct = list(dict.fromkeys(c for c in captions if c))
    count = max(1, min(len(distinct), num_samples // max(seeds_per_prompt, 1)))
    prompts = [c for c in distinct[:count] for _ in range(seeds_per_prompt)]
    seeds = [k for _ in range(count) for k in range(seeds_per_prompt)]
    return prompts, seeds


@torch.no_grad()
def generate(
    pipe: LatentDiffusionPipeline, prompts: list[str], seeds: list[int], scale: float, s: PipelineEvalSettings
) -> torch.Tensor:
    """One image per (prompt, seed), (N, 3, H, W) in [-1, 1]."""
    images = []
    for start in range(0, len(prompts), s.batch_size):
        out = pipe(
            prompts[start : start + s.batch_size],
            num_inference_steps=s.steps,
            guidance_scale=scale,
            sampler=s.sampler,
            seed=seeds[start : start + s.batch_size],
            output_type="pt_signed",
            progress=False,
        )
        images.append(out.images)  # (b, 3, H, W) in [-1, 1]
    return torch.cat(images)


def guidance_sweep(
    pipe: LatentDiffusionPipeline, captions: list[str], s: PipelineEvalSettings, clip=None
) -> tuple[list[dict], dict[float, torch.Tensor], list[str]]:
    """Rows {guidance, accuracy, color, shape, background, diversity, clip_score}; the images per scale."""
    prompts, seeds = sweep_prompts(captions, s.num_samples, s.seeds_per_prompt)
    rows, images = [], {}
    for scale in sorted(set(s.guidance_scales) | {s.guidance_scale}):
        x = generate(pipe, prompts, seeds, scale, s)
        images[scale] = x
        row: dict = {"guidance": scale, "n": len(prompts)}
        if s.shapes:
            scores = caption_accuracy(x, prompts)
            row |= {k: scores[k] for k in ("accuracy", "color", "shape", "background")}
        row["diversity"] = pairwise_diversity(x, prompts) if s.seeds_per_prompt > 1 else None
        if clip is not None:
            from ldm.eval.clip_score import clip_score

            row["clip_score"] = float(clip_score(*clip, x, prompts).mean())
        rows.append(row)
        logger.info("guidance %g: %s", scale, {k: v for k, v in row.items() if k != "guidance"})
    return rows, images, prompts


@torch.no_grad()
def latent_figures(
    pipe: LatentDiffusionPipeline, images: torch.Tensor, captions: list[str], s: PipelineEvalSettings
) -> dict:
    """The loss per timestep on held-out latents and, for DDPM models, the bound (bits/dim, with its
    terms). The bound is a DDPM quantity (Ho et al. 2020, eq. 5); for a rectified-flow model it is
    not defined, and ``bpd`` is None."""
    objective = pipe.objective
    ddpm = isinstance(objective, DDPM)
    dtype = pipe.dtype
    parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("prior", "diffusion", "decoder", "bpd", "per_timestep", "per_timestep_mse", "loss")
    }
    timesteps = weights = strata_end = loss_steps = None
    decoder = "discretized" if pipe.is_pixel_space else "gaussian"
    for start in range(0, len(images), s.batch_size):
        generator = torch.Generator().manual_seed(0)  # every chunk: the same timesteps, so they average
        z0 = pipe.encode_images(images[start : start + s.batch_size])  # (b, C, h, w)
        cond = pipe.encode_prompt(captions[start : start + s.batch_size])
        size = torch.tensor(images.shape[-2:])  # SDXL: uncropped images at their own size
        cond = pipe.conditioner.with_micro(cond, size, torch.zeros(2), size)

        def model(z_t: torch.Tensor, t: torch.Tensor, cond=cond) -> torch.Tensor:
            return pipe.unet(z_t.to(dtype), t, **pipe.conditioner.unet_kwargs(cond)).sample

        if ddpm:
            terms = variational_bound(
                model, z0.float(), objective.alphas_cumprod, objective.prediction_type,
                pipe.scheduler_config.get("variance_type", "fixed_small"), s.bound_strata, generator, decoder,
            )  # fmt: skip
            timesteps, weights, strata_end = terms["timesteps"], terms["weights"], terms["strata_end"]
            for k in ("prior", "diffusion", "decoder", "bpd", "per_timestep", "per_timestep_mse"):
                parts[k].append(terms[k].cpu())
        loss_steps, loss = loss_per_timestep(model, z0.float(), objective, s.timestep_points, generator)
        parts["loss"].append(loss.cpu())
    losses = {
        "objective": objective.name,
        "loss_timesteps": loss_steps.tolist(),
        "loss_per_timestep": torch.cat(parts["loss"], dim=-1).mean(1).tolist(),
    }
    if not ddpm:
        return {"num_latents": len(images), "bpd": None, **losses}
    cat = {k: torch.cat(v, dim=-1) for k, v in parts.items()}
    dims = z0[0].numel() * math.log(2)
    bpd = cat["bpd"]
    pixel = {}
    if pipe.is_pixel_space:  # DDPM's progressive lossy code: rate against distortion over t
        rate, rmse = rate_distortion(
            cat["prior"],
            cat["per_timestep"],
            weights,
            cat["per_timestep_mse"],
            z0[0].numel(),
            timesteps,
            strata_end,
        )
        pixel = {
            "rate_distortion": {
                "timesteps": timesteps.tolist(),
                "rate_bpd": rate.tolist(),
                "rmse": rmse.tolist(),
            }
        }
    return {
        "num_latents": len(bpd),
        "bound_decoder": decoder,
        "bpd": float(bpd.mean()),
        "bpd_stderr": float(bpd.std() / len(bpd) ** 0.5) if len(bpd) > 1 else 0.0,
        "prior_bpd": float(cat["prior"].mean() / dims),
        "diffusion_bpd": float(cat["diffusion"].mean() / dims),
        "decoder_bpd": float(cat["decoder"].mean() / dims),
        "bound_timesteps": timesteps.tolist(),
        "bound_per_timestep_bpd": (cat["per_timestep"].mean(1) / dims).tolist(),
        **pixel,
        **losses,
    }


FID_SKIPPED = "FID/KID skipped: no Inception weights (set eval.inception_weights=PATH to a local file)"
CLIP_SKIPPED = "CLIP score skipped: no CLIP model (set eval.clip_model=PATH to a local CLIPModel folder)"
ACCURACY_SKIPPED = "caption accuracy skipped: it reads images of the shapes dataset only"


def reference_images(folder: str, resolution: int) -> torch.Tensor:
    """Every image of a folder (recursively), resized and center-cropped to ``resolution``: (N, 3, R, R)."""
    from ldm.data.folder import ImageFolderDataset

    dataset = ImageFolderDataset(folder, resolution)
    return torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])


def distribution_figures(real: torch.Tensor, fake: torch.Tensor, s: PipelineEvalSettings) -> dict:
    """FID and KID of ``fake`` against ``real`` when Inception weights are given."""
    if s.inception_weights is None:
        return {}
    from ldm.eval.fid import frechet_distance, inception_features, kernel_inception_distance, load_inception

    net = load_inception(s.inception_weights, s.allow_pickle)
    a, b = inception_features(net, real), inception_features(net, fake)
    kid, kid_std = kernel_inception_distance(a, b, subsets=50, subset_size=min(len(a), len(b), 1000))
    return {"fid": frechet_distance(a, b), "kid": kid, "kid_std": kid_std, "fid_images": min(len(a), len(b))}


def evaluate_pipeline(
    pipe: LatentDiffusionPipeline, dataset: Dataset, s: PipelineEvalSettings
) -> tuple[dict, dict[float, torch.Tensor]]:
    """(every figure of the module docstring as one JSON-ready dict, the sweep's images per scale)."""
    for module in (pipe.unet, *pipe.text_encoders):
        module.eval()
    images, captions = held_out(dataset, max(s.num_samples, s.bound_samples))
    skipped = [m for m, off in [(ACCURACY_SKIPPED, not s.shapes), (FID_SKIPPED, s.inception_weights is None),
                                (CLIP_SKIPPED, s.clip_model is None)] if off]  # fmt: skip
    for message in skipped:
        logger.info(message)
    clip = None
    if s.clip_model is not None:
        from ldm.eval.clip_score import load_clip_scorer

        clip = load_clip_scorer(s.clip_model, s.allow_pickle)
    rows, sweep_images, prompts = guidance_sweep(pipe, captions, s, clip)
    results: dict = {
        "sampler": s.sampler,
        "steps": s.steps,
        "num_samples": len(prompts),
        "seeds_per_prompt": s.seeds_per_prompt,
        "guidance_scale": s.guidance_scale,
        "skipped": skipped,
        "guidance_sweep": rows,
    }
    for row in rows:
        if "accuracy" in row:
            results[f"guidance_{row['guidance']:g}"] = {
                k: row[k] for k in ("accuracy", "color", "shape", "background", "n")
            }
    fake = sweep_images[s.guidance_scale]
    real = reference_images(s.fid_reference, fake.shape[-1]) if s.fid_reference else images[: s.num_samples]
    results |= distribution_figures(real, fake, s)
    if "fid" in results:
        results["fid_reference"] = s.fid_reference or "held-out images"
    results |= latent_figures(pipe, images[: s.bound_samples], captions[: s.bound_samples], s)
    if results["bpd"] is not None:
        logger.info("bound: %.4f bits/dim (+- %.4f)", results["bpd"], results["bpd_stderr"])
    else:
        logger.info("bound: not defined for the %s objective (DDPM only)", results["objective"])
    return results, sweep_images
