"""Stage-2 training throughput: ``train_ldm.py`` against the loop of diffusers' text-to-image example.

Both train the default config (same models, data, batch, precision) as separate processes that
alternate (ours, reference, ours, ...), so that both see the same machine; each reports its
logged step times and the first window (warm-up) is dropped. Ours builds its latent cache once,
on disk, before the first timed run; its build time is reported apart.

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
    return [r["train/step_time"] for r in read_metrics(out / "metrics.jsonl")[1:]]


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
        times: dict[str, list[float]] = {"ours": [], "reference": []}
        for k in range(args.rounds):
            out = Path(tmp) / f"ours-{k}"
            times["ours"] += timed_run([sys.executable, "train_ldm.py", f"output_dir={out}", *ours_cfg], out)
            out = Path(tmp) / f"reference-{k}"
            times["reference"] += timed_run(
                [sys.executable, "bench/reference_ldm_loop.py", str(out), *common], out
            )
    batch = 64
    for o in args.overrides:
        if o.startswith("train.batch_size="):
            batch = int(o.split("=", 1)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    results = {
        "steps_per_run": args.steps, "rounds": args.rounds, "overrides": args.overrides, "batch": batch,
        "step_time_s": med, "images_per_s": {k: batch / v for k, v in med.items()},
        "speedup": med["reference"] / med["ours"], "windows_s": times, "ours_first_run_s_with_cache_build": first_run,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    ips = results["images_per_s"]
    sys.stdout.write(
        f"stage-2 training, batch {batch}: ours {ips['ours']:.1f} images/s ({med['ours'] * 1000:.0f} ms/step), "
        f"diffusers-example loop {ips['reference']:.1f} images/s ({med['reference'] * 1000:.0f} ms/step): "
        f"{results['speedup']:.2f}x\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
