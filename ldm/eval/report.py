"""The report of a text-to-image pipeline: ``report.md`` and its PNGs, next to ``eval.json``."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.core.images import save_grid
from ldm.eval.markdown import Section, write_report
from ldm.eval.plots import plot_guidance_sweep, plot_losses, plot_rate_distortion, plot_timestep_curves

GRID_COLUMNS = 12  # images per guidance scale in the grid


def pipeline_report(
    out: Path, results: dict, sweep_images: dict[float, torch.Tensor], title: str, run: Path | None = None
) -> Path:
    """Write the plots and ``out/report.md`` for ``results`` of ``evaluate_pipeline``; the loss
    curves and the final sample grid come from the run folder ``run`` (default: ``out``)."""
    out = Path(out)
    run = Path(run) if run is not None else out
    rows = results["guidance_sweep"]
    plot_guidance_sweep(rows, out / "guidance_sweep.png")
    plot_timestep_curves(
        results["loss_timesteps"], results["loss_per_timestep"],
        results.get("bound_timesteps"), results.get("bound_per_timestep_bpd"), out / "timestep_curves.png",
    )  # fmt: skip
    scales = sorted(sweep_images)
    columns = min(GRID_COLUMNS, *(len(v) for v in sweep_images.values()))
    save_grid(torch.cat([sweep_images[g][:columns] for g in scales]), out / "guidance_grid.png", nrow=columns)
    has_losses = (run / "metrics.jsonl").exists() and plot_losses(run / "metrics.jsonl", out / "losses.png")

    n, k = results["num_samples"], results["seeds_per_prompt"]
    sweep = Section(
        "Guidance sweep",
        f"{n // k} held-out captions x {k} seeds per guidance scale, {results['sampler']}, "
        f"{results['steps']} steps. Caption accuracy: color, shape and background read from the pixels "
        "all match the caption. Diversity: mean RMS pixel distance (0-1 scale) between the images of "
        f"one caption. Grid: the first {columns} images at each scale, one row per scale "
        f"({', '.join(f'{g:g}' for g in scales)}).",
        ["guidance", "caption accuracy", "color", "shape", "background", "diversity", "CLIP score"],
        [
            [
                r["guidance"],
                _percent(r.get("accuracy")),
                _percent(r.get("color")),
                _percent(r.get("shape")),
                _percent(r.get("background")),
                r.get("diversity"),
                r.get("clip_score"),
            ]
            for r in rows
        ],  # fmt: skip
        [out / "guidance_sweep.png", out / "guidance_grid.png"],
    )
    if results.get("bpd") is None:  # not a DDPM model
        bound = Section(
            "Loss per timestep",
            f"On {results['num_latents']} held-out latents, the training loss of the {results.get('objective')} "
            "objective at timesteps across its range. The variational bound of Ho et al. (2020) is defined for "
            "the DDPM objective only; this model was trained with another, so no bound is reported.",
            images=[out / "timestep_curves.png"],
        )
    elif results.get("bound_decoder") == "discretized":
        bound = _pixel_bound(out, results)
    else:
        bound = Section(
            "Variational bound",
            f"On {results['num_latents']} held-out latents (the autoencoder's posterior mean, scaled), "
            "L_T + sum L_{t-1} + L_0 of Ho et al. (2020) with the Gaussian posterior q(z_{t-1} | z_t, z_0) "
            "and the model's fixed variance; the sum over t is estimated from one timestep in each of "
            f"{len(results['bound_timesteps'])} strata. Latents are continuous, so L_0 is a density and "
            "the bound (bits per latent dimension) compares models on the same autoencoder; it can be negative.",
            ["term", "bits/dim"],
            [
                ["total", f"{results['bpd']:.4f} +- {results['bpd_stderr']:.4f} (standard error)"],
                ["L_T (prior)", results["prior_bpd"]],
                ["sum L_{t-1} (diffusion)", results["diffusion_bpd"]],
                ["L_0 (decoder)", results["decoder_bpd"]],
            ],  # fmt: skip
            [out / "timestep_curves.png"],
        )
    sections = [sweep]
    if "fid" in results:
        sections.append(
            Section(
                "FID and KID",
                f"{results['fid_images']} samples at guidance {results['guidance_scale']:g} against "
                f"{results['fid_images']} reference images ({results['fid_reference']}), Inception-v3 pool features.",
                ["FID", "KID", "KID std"],
                [[results["fid"], results["kid"], results["kid_std"]]],
            )
        )
    sections.append(bound)
    if has_losses:
        sections.append(Section("Training", "Loss curves from metrics.jsonl.", images=[out / "losses.png"]))
    if (run / "samples" / "final.png").exists():
        sections.append(
            Section("Samples", "The final grid of the run.", images=[run / "samples" / "final.png"])
        )
    if results.get("skipped"):
        sections.append(Section("Not measured", "\n".join(f"- {m}" for m in results["skipped"])))
    return write_report(out, title, sections)


def _pixel_bound(out: Path, results: dict) -> Section:
    """The bound of a pixel-space model (a true NLL in bits/dim) with its rate-distortion curve."""
    rd = results["rate_distortion"]
    plot_rate_distortion(rd["timesteps"], rd["rate_bpd"], rd["rmse"], out / "rate_distortion.png")
    picks = sorted({0, len(rd["timesteps"]) // 4, len(rd["timesteps"]) // 2, len(rd["timesteps"]) - 1})
    return Section(
        "Variational bound and rate-distortion",
        f"On {results['num_latents']} held-out images (a pixel-space model: no autoencoder), "
        "L_T + sum L_{t-1} + L_0 of Ho et al. (2020), L_0 the discretized Gaussian decoder over 256 levels "
        "(their eq. 13): the negative log-likelihood of the 8-bit images in bits per dimension (DDPM's "
        "CIFAR-10 figure: 3.70 trained on the bound, 3.75 with L_simple); the sum over t from one timestep "
        f"in each of {len(rd['timesteps'])} strata. The rate-distortion curve is DDPM's progressive lossy "
        "code (their section 4.3): sending x_T..x_t costs L_T + sum_{s>t} L_{s-1} bits, and x^_0(x_t) is "
        "that far from the image (RMSE on the [0, 255] scale).",
        ["term", "bits/dim"],
        [
            ["total (NLL)", f"{results['bpd']:.4f} +- {results['bpd_stderr']:.4f} (standard error)"],
            ["L_T (prior)", results["prior_bpd"]],
            ["sum L_{t-1} (diffusion)", results["diffusion_bpd"]],
            ["L_0 (discretized decoder)", results["decoder_bpd"]],
            *[
                [f"rate at t = {rd['timesteps'][i]} (RMSE {rd['rmse'][i]:.2f})", rd["rate_bpd"][i]]
                for i in picks
            ],
        ],  # fmt: skip
        [out / "timestep_curves.png", out / "rate_distortion.png"],
    )


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}%"
