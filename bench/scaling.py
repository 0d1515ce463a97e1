"""Scaling of the stage-2 training step: time per step and peak memory against batch and resolution.

Each point runs in its own process (``--point BATCH RESOLUTION``), so that its peak memory is its
own: on CUDA ``torch.cuda.max_memory_allocated``, on the CPU the growth of the process's peak
resident set over what it held after building the models.

    python bench/scaling.py [--batches 16 32 64 128] [--resolutions 32 64] [--steps 5]
        [--out bench/results/scaling.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from ldm.core.config import CONFIG_DIR, load_config
from ldm.train.config import LDMRunConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mfu import DTYPES, time_steps, training_step  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def point(
    batch: int, resolution: int, steps: int, device: torch.device, dtype: str, overrides: list[str]
) -> dict:
    cfg = load_config(
        LDMRunConfig, CONFIG_DIR / "ldm/shapes.yaml", [f"data.resolution={resolution}", *overrides]
    )
    step, _ = training_step(cfg, batch, device, DTYPES[dtype], count_flops=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = peak_rss_bytes()
    step_time = time_steps(step, steps, device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes() - base
    return {"batch": batch, "resolution": resolution, "step_time_s": step_time, "images_per_s": batch / step_time,
            "peak_memory_bytes": peak}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--point", type=int, nargs=2, metavar=("BATCH", "RESOLUTION"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaling.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.point:
        result = point(*args.point, args.steps, device, args.dtype, args.overrides)
        sys.stdout.write(json.dumps(result) + "\n")
        return 0

    rows = []
    for resolution in args.resolutions:
        for batch in args.batches:
            cmd = [sys.executable, __file__, "--point", str(batch), str(resolution), "--steps", str(args.steps),
                   "--device", args.device, "--dtype", args.dtype, *args.overrides]  # fmt: skip
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            sys.stdout.write(
                f"resolution {resolution:4d} px, batch {batch:4d}: {r['step_time_s'] * 1000:7.0f} ms/step, "
                f"{r['images_per_s']:6.1f} images/s, peak memory +{r['peak_memory_bytes'] / 2**20:6.0f} MiB\n"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"device": args.device, "dtype": args.dtype, "points": rows}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
