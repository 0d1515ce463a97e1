"""Peak resident memory of stage 2 training on the disk latent cache, against the data's size.

    python bench/disk_cache_memory.py [--sizes 20000 200000] [--processes 1 2] [--root /tmp/disk-cache-bench]

For each size: ``ldm-cache`` writes the cache (default config, ``data.train_size=N``, ``cache_dir``),
then ``train_ldm.py`` trains 20 steps on it with 1 and with 2 CPU processes (``accelerate launch``).
Each training process reports its peak resident memory (``ru_maxrss``) at exit; printed per size and
process count, with the growth from the smallest size. Evaluation and grids are off (they do not
depend on the data's size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = """
import atexit, json, os, resource, runpy, sys
out = sys.argv[1]
def report():
    rank = os.environ.get("RANK", "0")
    with open(f"{out}/rss-{rank}.json", "w") as f:
        json.dump({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)
atexit.register(report)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--root", type=Path, default=Path("/tmp/disk-cache-bench"))
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    driver = args.root / "driver.py"
    driver.write_text(DRIVER)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",
    }  # CPU: comparable
    common = ["train.compile=false", "eval.num_samples=0", "train.sample_every=0", "train.checkpoint_every=0"]
    peaks: dict[tuple[int, int], list[float]] = {}
    for n in args.sizes:
        cache = [f"data.train_size={n}", f"cache_dir={args.root / 'cache'}"]
        run([sys.executable, "-m", "ldm.cli.cache", *cache], env)
        for p in args.processes:
            out = args.root / f"run-{n}-{p}"
            out.mkdir(exist_ok=True)
            train = [str(driver), str(out), "train_ldm.py", *cache, *common, "train.max_steps=20",
                     f"train.batch_size={64 // p}", f"output_dir={out}"]  # fmt: skip
            if p == 1:
                run([sys.executable, *train], env)
            else:
                run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(p),
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *train],
                    {**env, "ACCELERATE_USE_CPU": "1"})  # fmt: skip
            peaks[(n, p)] = [
                json.loads((out / f"rss-{r}.json").read_text())["peak_kib"] / 1024 for r in range(p)
            ]
    base = min(args.sizes)
    for (n, p), mib in sorted(peaks.items()):
        growth = [m - b for m, b in zip(mib, peaks[(base, p)], strict=True)]
        sys.stdout.write(
            f"{n:>9} items, {p} process(es): peak RSS {', '.join(f'{m:.0f}' for m in mib)} MiB"
            f" (growth from {base}: {', '.join(f'{g:+.0f}' for g in growth)} MiB)\n"
        )


if __name__ == "__main__":
    main()
