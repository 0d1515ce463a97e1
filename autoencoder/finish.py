"""Stage 1 after training: the measured scaling factor, the export, the evaluation and the report."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.data import Dataset, IterableDataset

from autoencoder.config import VAERunConfig
from autoencoder.evaluate import evaluate_autoencoder, save_reconstructions
from autoencoder.export import export_autoencoder, measure_scaling_factor
from autoencoder.report import autoencoder_report
from autoencoder.setup import perceptual_loss
from ldm.eval.plots import plot_losses


def export_and_evaluate(
    vae: AutoencoderKL, cfg: VAERunConfig, out: Path, train_set: Dataset, val_set: Dataset,
    fixed: torch.Tensor, lpips: torch.nn.Module | None, device: torch.device,
) -> dict:  # fmt: skip
    """Export ``out/model`` with its ``scaling_factor``, the final reconstructions, ``report.md`` and
    the loss curves; returns the evaluation's figures."""
    vae.eval()
    batch = cfg.train.batch_size * 4
    if (
        cfg.train.decoder_only
    ):  # the encoder did not change: keep the scale the diffusion model was trained with
        scaling_factor = vae.config.scaling_factor
    else:  # from training images (unaugmented); a stream has no index: its validation items then
        scale_set = val_set if isinstance(train_set, IterableDataset) else train_set
        scaling_factor = measure_scaling_factor(vae, scale_set, cfg.eval.scale_samples, batch)
    export_autoencoder(vae, out / "model", scaling_factor)
    save_reconstructions(vae, fixed, out / "samples" / "final.png")
    if lpips is None:  # LPIPS as a metric even when it is not in the loss, if its weights are present
        lpips = perceptual_loss(cfg, device, for_metric=True)
    results = evaluate_autoencoder(
        vae, val_set, cfg.eval, batch_size=batch, allow_pickle=cfg.allow_pickle, lpips=lpips
    )
    results["scaling_factor"] = scaling_factor
    autoencoder_report(out, results, f"Report: {out.name}")
    plot_losses(out / "metrics.jsonl", out / "losses.png")
    return results
