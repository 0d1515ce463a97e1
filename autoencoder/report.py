"""The report of an autoencoder: ``report.md`` next to ``eval.json``, with its loss curves and samples."""

from __future__ import annotations

from pathlib import Path

from ldm.eval.markdown import Section, write_report
from ldm.eval.plots import plot_losses


def autoencoder_report(out: Path, results: dict, title: str, run: Path | None = None) -> Path:
    """Write ``out/report.md`` for ``results`` of ``evaluate_autoencoder`` (plus ``scaling_factor``);
    the loss curves and samples come from the run folder ``run`` (default: ``out``)."""
    out = Path(out)
    run = Path(run) if run is not None else out
    n = results["num_samples"]
    sections = [
        Section(
            "Reconstruction",
            f"{n} validation images through the posterior mean. PSNR in dB (capped at 100), SSIM with an "
            "11 px Gaussian window, LPIPS (VGG) and rFID when their weights are present.",
            ["PSNR (dB)", "SSIM", "LPIPS", "rFID"],
            [[results["psnr"], results["ssim"], results.get("lpips"), results.get("rfid")]],
        ),
        Section(
            "Latents",
            "Statistics of the posterior means (before scaling) and the factor stage 2 multiplies them by.",
            ["latent mean", "latent std", "posterior std", "scaling_factor"],
            [
                [
                    results["latent_mean"],
                    results["latent_std"],
                    results["posterior_std"],
                    results.get("scaling_factor"),
                ]
            ],
        ),
    ]
    if (run / "metrics.jsonl").exists() and plot_losses(run / "metrics.jsonl", out / "losses.png"):
        sections.append(Section("Training", "Loss curves from metrics.jsonl.", images=[out / "losses.png"]))
    grids = [p for p in (run / "samples" / "final.png", out / "reconstructions.png") if p.exists()]
    if grids:
        sections.append(
            Section("Reconstructions", "Originals (top row) and reconstructions (bottom row).", images=grids)
        )
    if results.get("skipped"):
        sections.append(Section("Not measured", "\n".join(f"- {m}" for m in results["skipped"])))
    return write_report(out, title, sections)
