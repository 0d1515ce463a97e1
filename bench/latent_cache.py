"""Speed-up of stage-2 training from the latent cache, measured in one run.

Runs the default shapes training twice in this process, with the latent cache and with the
frozen autoencoder encoding every batch (as diffusers' train_text_to_image does), the same
model, batch and data otherwise, and compares steady-state throughput (images/s from the
logged step times, the first window excluded) and wall time including the cache's build.

    python bench/latent_cache.py [--steps 60] [--out bench/results/latent_cache.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from ldm.core.config import CONFIG_DIR, load_config
from ldm.train.config import LDMRunConfig
from ldm.train.diffusion import train_ldm
from ldm.training.metrics import read_metrics


def run(cache: bool, steps: int, vae: str, out: Path) -> dict[str, float]:
    cfg = load_config(
        LDMRunConfig,
        CONFIG_DIR / "ldm/shapes.yaml",
        [
            f"output_dir={out}",
            f"vae={vae}",
            f"cache_latents={str(cache).lower()}",
            f"train.max_steps={steps}",
            "train.log_every=10",
            "train.sample_every=0",
            "train.checkpoint_every=0",
            "eval.num_samples=0",
        ],
    )
    t0 = time.perf_counter()
    train_ldm(cfg)
    wall = time.perf_counter() - t0
    rows = read_metrics(out / "metrics.jsonl")[1:]  # the first window holds warm-up
    if not rows:
        raise SystemExit(f"--steps {steps} is too few: give at least 20 (two logging windows)")
    step_time = sum(r["train/step_time"] for r in rows) / len(rows)
    return {"step_time_s": step_time, "images_per_s": cfg.train.batch_size / step_time, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--vae", default="runs/vae-shapes/model", help="a stage-1 export (python train_vae.py)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/latent_cache.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "on_the_fly": run(False, args.steps, args.vae, Path(tmp) / "on-the-fly"),
            "cached": run(True, args.steps, args.vae, Path(tmp) / "cached"),
        }
    results["speedup"] = results["cached"]["images_per_s"] / results["on_the_fly"]["images_per_s"]
    results["steps"] = args.steps
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.write(
        f"latent cache: {results['cached']['images_per_s']:.1f} images/s vs "
        f"{results['on_the_fly']['images_per_s']:.1f} encoding on the fly: {results['speedup']:.2f}x "
        f"(wall {results['cached']['wall_s']:.0f} s vs {results['on_the_fly']['wall_s']:.0f} s for {args.steps} steps, "
        f"cache build included)\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
