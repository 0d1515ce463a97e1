"""Stage-2 training throughput: ``train_ldm.py`` against the loop of diffusers' text-to-image example.

All contenders train the default config (same models, data, batch, precision) as separate processes
that run in turn, round after round, the order rotated by one each round so that none always runs
first or last; all see the same machine. Each reports its logged step times; the first window of
each run (warm-up, and ours' compiling) is dropped from the medians and kept in the JSON.

Two comparisons, each with the text encoder treated the same way on both sides:

- text encoder trained (``train_ldm.py``'s default: its scratch encoder is trained jointly):
  ``ours`` (``train.compile`` on, as in the default config) and ``ours_eager``
  (``train.compile=false``) against ``reference_trained_text``
  (``bench/reference_ldm_loop.py --train-text-encoder``);
- text encoder frozen (the example as it is): ``ours_frozen_text`` (``text.train=false``) against
  ``reference_frozen_text`` (``bench/reference_ldm_loop.py``).

Ours builds its latent cache once, on disk, before the first timed run; that run's time is reported
apart. Each ratio is the reference's median step time over ours'.

    python bench/train_throughput.py [--steps 40] [--rounds 3] [--log-every 10] [key=value ...] [--out bench/results/train_throughput.json]
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

from ldm.core.config import CONFIG_DIR, load_config
from ldm.train.config import LDMRunConfig
from ldm.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "bench/reference_ldm_loop.py"


def run_quiet(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` from the repository root with its output in ``log``; on failure, show its tail."""
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{' '.join(cmd)} exited with {done.returncode}; its last lines:\n{tail}")


def timed_run(cmd: list[str], out: Path) -> list[float]:
    out.parent.mkdir(parents=True, exist_ok=True)
    run_quiet(cmd, out.with_name(out.name + ".log"))
    return [r["train/step_time"] for r in read_metrics(out / "metrics.jsonl")]


def rotated(names: list[str], k: int) -> list[str]:
    """Round ``k``'s order: the list rotated left by ``k``."""
    k %= len(names)
    return names[k:] + names[:k]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each contender")
    parser.add_argument("--log-every", type=int, default=10, help="steps per timed window")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    parser.add_argument("overrides", nargs="*", help="train_ldm.py config overrides for all")
    args = parser.parse_args(argv)
    if args.log_every < 1 or args.rounds < 1 or args.steps < 2 * args.log_every:
        parser.error(
            f"--steps ({args.steps}) must be at least twice --log-every ({args.log_every}) and --rounds >= 1: "
            "the first window of each run is dropped"
        )
    for o in args.overrides:
        if o.split("=", 1)[0].strip() in ("text.train", "train.log_every", "train.max_steps"):
            parser.error(f"{o!r}: this key is set by the benchmark (see --steps, --log-every)")
    batch = load_config(LDMRunConfig, CONFIG_DIR / "ldm/shapes.yaml", args.overrides).train.batch_size

    with tempfile.TemporaryDirectory() as tmp:
        common = [f"train.max_steps={args.steps}", f"train.log_every={args.log_every}", *args.overrides]
        ours_cfg = [*common, f"cache_dir={tmp}/cache", "train.sample_every=0", "train.checkpoint_every=0",
                    "eval.num_samples=0"]  # fmt: skip
        ours = [sys.executable, "train_ldm.py"]
        t0 = time.perf_counter()  # the first run builds the latent cache on disk; later runs read it
        run_quiet([*ours, f"output_dir={tmp}/warm", *ours_cfg, "text.train=true"], Path(tmp) / "warm.log")
        first_run = time.perf_counter() - t0
        commands = {  # name -> command line, given its output folder; ours and the references alternate
            "ours": lambda out: [*ours, f"output_dir={out}", *ours_cfg, "text.train=true"],
            "reference_trained_text": lambda out: [sys.executable, REFERENCE, str(out), "--train-text-encoder",
                                                   *common],
            "ours_eager": lambda out: [*ours, f"output_dir={out}", *ours_cfg, "text.train=true",
                                       "train.compile=false"],
            "ours_frozen_text": lambda out: [*ours, f"output_dir={out}", *ours_cfg, "text.train=false"],
            "reference_frozen_text": lambda out: [sys.executable, REFERENCE, str(out), *common],
        }  # fmt: skip
        names = list(commands)
        times: dict[str, list[float]] = {name: [] for name in names}
        first: dict[str, list[float]] = {name: [] for name in names}
        orders = []
        for k in range(args.rounds):
            order = rotated(names, k)
            orders.append(order)
            for name in order:
                out = Path(tmp) / f"{name}-{k}"
                windows = timed_run(commands[name](out), out)
                first[name].append(windows[0])
                times[name] += windows[1:]
    med = {k: statistics.median(v) for k, v in times.items()}
    speedups = {
        "trained_text": med["reference_trained_text"] / med["ours"],
        "trained_text_eager": med["reference_trained_text"] / med["ours_eager"],
        "frozen_text": med["reference_frozen_text"] / med["ours_frozen_text"],
    }
    results = {
        "steps_per_run": args.steps, "rounds": args.rounds, "log_every": args.log_every,
        "overrides": args.overrides, "batch": batch,
        "comparisons": {
            "trained_text": {"ours": ["ours", "ours_eager"], "reference": "reference_trained_text"},
            "frozen_text": {"ours": ["ours_frozen_text"], "reference": "reference_frozen_text"},
        },
        "step_time_s": med, "images_per_s": {k: batch / v for k, v in med.items()},
        "speedup": speedups,  # reference step time / ours
        "orders": orders, "windows_s": times, "first_windows_s": first,
        "ours_first_run_s_with_cache_build": first_run,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    def rate(name: str) -> str:
        return f"{batch / med[name]:.1f} images/s ({med[name] * 1000:.0f} ms/step)"

    sys.stdout.write(
        f"stage-2 training, batch {batch}, text encoder trained: ours {rate('ours')}, "
        f"ours eager {rate('ours_eager')}, diffusers-example loop with the text encoder trained "
        f"{rate('reference_trained_text')}: {speedups['trained_text']:.2f}x "
        f"(eager {speedups['trained_text_eager']:.2f}x)\n"
        f"stage-2 training, batch {batch}, text encoder frozen: ours {rate('ours_frozen_text')}, "
        f"diffusers-example loop (as the example, frozen) {rate('reference_frozen_text')}: "
        f"{speedups['frozen_text']:.2f}x\n"
        f"results: {args.out}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
