"""Plots to PNG: loss curves from ``metrics.jsonl``, the loss and bound per timestep, the rate-distortion
curve of a pixel model, the guidance sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ldm.training.metrics import read_metrics  # noqa: E402


def plot_losses(metrics_path: Path, png_path: Path, prefix: str = "train/") -> list[str]:
    """One panel per logged ``prefix*`` loss term against the step (``val/loss`` with the total);
    returns the keys plotted."""
    rows = read_metrics(metrics_path)
    keys = sorted({k for r in rows for k in r if k.startswith(prefix) and "loss" in k})
    if not keys:
        return []
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=1, label=key)
        val = [(r["step"], r["val/loss"]) for r in rows if isinstance(r.get("val/loss"), (int, float))]
        if key == f"{prefix}loss" and val:  # the validation loss on the training loss's panel
            ax.plot(*zip(*val, strict=True), marker="o", ms=3, lw=1, label="val/loss")
            ax.legend(fontsize=7)
        ax.set_ylabel(key.removeprefix(prefix), fontsize=8)
        if key.endswith(("rec_loss", "kl_loss", "loss")) and pts and min(v for _, v in pts) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    _save(fig, png_path)
    return keys


def _save(fig, png_path: Path) -> None:
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_timestep_curves(
    timesteps: list[float],
    loss: list[float],
    kl_t: list[int] | None,
    kl_bpd: list[float] | None,
    png_path: Path,
) -> None:
    """The training loss against the timestep (left) and, for DDPM models, the bound's L_{t-1} terms
    in bits/dim (right)."""
    fig, axes = plt.subplots(1, 2 if kl_t is not None else 1, figsize=(9 if kl_t is not None else 4.5, 3.2))
    axes = list(axes) if kl_t is not None else [axes]
    axes[0].plot(timesteps, loss, marker="o", ms=3, lw=1)
    axes[0].set_xlabel("timestep t")
    axes[0].set_ylabel("training loss (MSE)")
    axes[0].set_yscale("log")
    if kl_t is not None:
        axes[1].plot(kl_t, kl_bpd, marker="o", ms=2, lw=1, color="tab:red")
        axes[1].set_xlabel("timestep t")
        axes[1].set_ylabel("L_{t-1} (bits/dim)")
        axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, png_path)


def plot_rate_distortion(timesteps: list[int], rate: list[float], rmse: list[float], png_path: Path) -> None:
    """DDPM's progressive lossy compression (Ho et al. 2020, Fig. 5): distortion against rate (left),
    and each against the timestep the code stops at (middle, right)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(rate, rmse, marker="o", ms=2, lw=1)
    axes[0].set_xlabel("rate (bits/dim)")
    axes[0].set_ylabel("distortion (RMSE, [0, 255])")
    axes[1].plot(timesteps, rate, marker="o", ms=2, lw=1, color="tab:green")
    axes[1].set_ylabel("rate (bits/dim)")
    axes[2].plot(timesteps, rmse, marker="o", ms=2, lw=1, color="tab:red")
    axes[2].set_ylabel("distortion (RMSE, [0, 255])")
    for ax in axes[1:]:
        ax.set_xlabel("timestep t")
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, png_path)


def plot_guidance_sweep(rows: list[dict], png_path: Path) -> None:
    """Caption accuracy (when measured) and sample diversity against the guidance scale."""
    scales = [r["guidance"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    if all(r.get("accuracy") is not None for r in rows):
        ax.plot(scales, [100 * r["accuracy"] for r in rows], marker="o", label="caption accuracy (%)")
    ax.set_xlabel("guidance scale")
    ax.set_ylabel("caption accuracy (%)")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(scales, [r["diversity"] for r in rows], marker="s", color="tab:orange", label="diversity")
    twin.set_ylabel("diversity (RMS pixel distance)", color="tab:orange")
    _save(fig, png_path)
