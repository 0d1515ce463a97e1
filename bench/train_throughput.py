"""Stage-2 training throughput: ``train_ldm.py`` against the loop of diffusers' text-to-image example.

Both train the default config (same models, data, batch, precision) as separate processes that
alternate (ours, ours eager, reference, ours, ...), so that all see the same machine; each reports
its logged step times and the first window (warm-up, and ours' compiling) is dropped; the first
windows are kept in the JSON. "ours eager" is ours with ``train.compile=false``. Ours builds its
latent cache once, on disk, before the first timed run; that run's time is reported apart.

    python bench/train_throughput.py [--steps 40] [--rounds 3] [key=value ...] [--out bench/results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ldm.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def timed_run(cmd: list[str], out: Path) -> list[float]:
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [r["train/step_time"] for r in read_metrics(out / "metrics.jsonl")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    parser.add_argument("overrides", nargs="*", help="train_ldm.py config overrides for both")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        common = [f"train.max_steps={args.steps}", "train.log_every=10", *args.overrides]
        ours_cfg = [*common, f"cache_dir={tmp}/cache", "train.sample_every=0", "train.checkpoint_every=0",
                    "eval.num_samples=0"]  # fmt: skip
        t0 = time.perf_counter()  # the first run builds the latent cache on disk; later runs read it
        subprocess.run([sys.executable, "train_ldm.py", f"output_dir={tmp}/warm", *ours_cfg], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        first_run = time.perf_counter() - t0
        commands = {  # output folder -> command line
            "ours": lambda out: [sys.executable, "train_ldm.py", f"output_dir={out}", *ours_cfg],
            "ours_eager": lambda out: [sys.executable, "train_ldm.py", f"output_dir={out}", *ours_cfg,
                                       "train.compile=false"],
            "reference": lambda out: [sys.executable, "bench/reference_ldm_loop.py", str(out), *common],
        }  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in commands}
        first: dict[str, list[float]] = {name: [] for name in commands}
        for k in range(args.rounds):
            for name, command in commands.items():
                out = Path(tmp) / f"{name}-{k}"
                windows = timed_run(command(out), out)
                first[name].append(windows[0])
                times[name] += windows[1:]
    batch = 64
    for o in args.overrides:
        if o.startswith("train.batch_size="):
            batch = int(o.split("=", 1)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    results = {
        "steps_per_run": args.steps, "rounds": args.rounds, "overrides": args.overrides, "batch": batch,
        "step_time_s": med, "images_per_s": {k: batch / v for k, v in med.items()},
        "speedup": med["reference"] / med["ours"], "speedup_eager": med["reference"] / med["ours_eager"],
        "windows_s": times, "first_windows_s": first, "ours_first_run_s_with_cache_build": first_run,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    ips = results["images_per_s"]
    sys.stdout.write(
        f"stage-2 training, batch {batch}: ours {ips['ours']:.1f} images/s ({med['ours'] * 1000:.0f} ms/step), "
        f"ours eager {ips['ours_eager']:.1f} images/s ({med['ours_eager'] * 1000:.0f} ms/step), "
        f"diffusers-example loop {ips['reference']:.1f} images/s ({med['reference'] * 1000:.0f} ms/step): "
        f"{results['speedup']:.2f}x (eager {results['speedup_eager']:.2f}x)\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
