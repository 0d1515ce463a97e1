"""Stage-1 training throughput of ``train_vae.py`` on the default config, without and with the GAN.

Runs ``train_vae.py`` for ``--steps`` steps in subprocesses: the discriminator off, eagerly and with
``train.compile=true``, then on from step 0 (steps with the GAN always run eagerly), and reports
steady-state images/s from the logged step times (the first window, which holds the compiling,
dropped) and the compiled speedup.

    python bench/vae_throughput.py [--steps 60] [--out bench/results/vae_throughput.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ldm.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vae_throughput.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            ("autoencoder only", 10**9, False),
            ("autoencoder only, compiled", 10**9, True),
            ("with GAN", 0, False),
        ]
        for name, disc_start, compile_ in runs:
            out = Path(tmp) / f"{disc_start}-{compile_}"
            cmd = [sys.executable, "train_vae.py", f"output_dir={out}", f"train.max_steps={args.steps}",
                   f"train.batch_size={args.batch}", "train.log_every=10", "train.sample_every=0",
                   "train.checkpoint_every=0", "eval.num_samples=16", "eval.scale_samples=64",
                   f"loss.disc_start={disc_start}", f"train.compile={str(compile_).lower()}", *args.overrides]  # fmt: skip
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            step = statistics.median(r["train/step_time"] for r in read_metrics(out / "metrics.jsonl")[1:])
            results[name] = {"step_time_s": step, "images_per_s": args.batch / step}
    eager, compiled = results["autoencoder only"], results["autoencoder only, compiled"]
    compiled["speedup"] = eager["step_time_s"] / compiled["step_time_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"batch": args.batch, "steps": args.steps, **results}, indent=2) + "\n")
    parts = [
        f"{k} {v['images_per_s']:.0f} images/s ({v['step_time_s'] * 1000:.0f} ms/step"
        + (f", {v['speedup']:.2f}x eager)" if "speedup" in v else ")")
        for k, v in results.items()
    ]
    sys.stdout.write(f"stage-1 training, batch {args.batch}: {'; '.join(parts)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
