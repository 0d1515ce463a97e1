"""Loss curves from ``metrics.jsonl`` to a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ldm.training.metrics import read_metrics  # noqa: E402


def plot_losses(metrics_path: Path, png_path: Path, prefix: str = "train/") -> list[str]:
    """One panel per logged ``prefix*`` loss term against the step; returns the keys plotted."""
    rows = read_metrics(metrics_path)
    keys = sorted({k for r in rows for k in r if k.startswith(prefix) and "loss" in k})
    if not keys:
        return []
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=1)
        ax.set_ylabel(key.removeprefix(prefix), fontsize=8)
        if key.endswith(("rec_loss", "kl_loss", "loss")) and pts and min(v for _, v in pts) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return keys
