"""Our multi-process overhead on the CPU: 2 processes against 1 at the same per-process batch.

    python bench/ddp_throughput.py [--steps 40] [--batch 32] [--threads 1] [--engines ddp,fsdp,deepspeed]

Trains the default stage 2 for ``--steps`` steps on 1 process and on 2 (``accelerate launch``, gloo)
under each engine (DDP; FSDP2 through ``bench/fsdp_on_cpu.py``; DeepSpeed ZeRO-2), each process with
``--threads`` threads and a batch of ``--batch`` (so 2 processes do twice the work per step), and
prints images per second over the steps after the first 10 (from ``metrics.jsonl``'s
``train/step_time``). Ideal on 2 cores: 2x, less the communication (DDP: one all-reduce of the
gradients; FSDP: all-gathers of the weights in the forward and again in the backward, and a
reduce-scatter of the gradients; ZeRO-2: a reduce-scatter and an all-gather of the weights).
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
    parser.add_argument("--engines", default="ddp")
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
    for engine in ["one", *args.engines.split(",")]:
        out = args.root / engine
        train = ["train_ldm.py", *common, f"output_dir={out}"]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
        config = lambda name: ["--config_file", str(ROOT / "configs" / "accelerate" / name)]  # noqa: E731
        cmd, run_env = {
            "one": ([sys.executable, *train], env),
            "ddp": ([*launch, "--multi_gpu", *train], env),
            "fsdp": ([*launch, *config("fsdp.yaml"), str(ROOT / "bench" / "fsdp_on_cpu.py"), *train], env),
            "deepspeed": ([*launch, *config("deepspeed-zero2.yaml"), *train],
                          {k: v for k, v in env.items() if k != "ACCELERATE_USE_CPU"}),
        }[engine]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        speed[engine] = images_per_second(out, args.batch, 1 if engine == "one" else 2, skip=10)
    lines = [f"1 process: {speed['one']:.1f} images/s"]
    lines += [
        f"2 processes, {e}: {speed[e]:.1f} images/s ({speed[e] / speed['one']:.2f}x)"
        for e in speed
        if e != "one"
    ]
    sys.stdout.write("; ".join(lines) + f" (batch {args.batch} per process, {args.threads} thread(s) each)\n")


if __name__ == "__main__":
    main()
