"""Our data-parallel overhead on the CPU: 2 processes against 1 at the same per-process batch.

    python bench/ddp_throughput.py [--steps 40] [--batch 32] [--threads 1]

Trains the default stage 2 for ``--steps`` steps on 1 process and on 2 (``accelerate launch``, gloo),
each process with ``--threads`` threads and a batch of ``--batch`` (so 2 processes do twice the
work per step), and prints images per second over the steps after the first 10 (from
``metrics.jsonl``'s ``train/step_time``). Ideal on 2 cores: 2x, less the gradient all-reduce.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def images_per_second(out: Path, batch: int, processes: int, skip: int) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["train/step_time"] for r in rows if r["step"] > skip and "train/step_time" in r]
    return batch * processes / (sum(times) / len(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", type=Path, default=Path("/tmp/ddp-throughput"))
    args = parser.parse_args()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
        "ACCELERATE_USE_CPU": "1",
    }
    common = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", "train.log_every=1",
              "train.compile=false", "eval.num_samples=0", "train.sample_every=0", "train.checkpoint_every=0",
              "train.val_every=0", "data.train_size=8000"]  # fmt: skip
    speed = {}
    for processes in (1, 2):
        out = args.root / f"p{processes}"
        train = ["train_ldm.py", *common, f"output_dir={out}"]
        if processes == 1:
            cmd = [sys.executable, *train]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *train]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        speed[processes] = images_per_second(out, args.batch, processes, skip=10)
    sys.stdout.write(
        f"1 process: {speed[1]:.1f} images/s; 2 processes: {speed[2]:.1f} images/s "
        f"({speed[2] / speed[1]:.2f}x; batch {args.batch} per process, {args.threads} thread(s) each)\n"
    )


if __name__ == "__main__":
    main()
