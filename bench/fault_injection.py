"""Fault injection: SIGKILL training at random points, resume each time, compare with an uninterrupted run.

For each stage, a tiny CPU run (same seed, EMA on, a checkpoint every few steps) is trained
once straight through, then again while being killed ``--faults`` times. Each kill comes at a
random training step, either at a random moment inside that step or the moment a checkpoint
starts being written (a ``.tmp-step-*`` folder appears). After each kill, training starts again
with ``--resume latest`` (from scratch while no checkpoint exists). The final weights of the
killed run must equal the uninterrupted run's.

    python bench/fault_injection.py [--faults 10] [--stage ldm|vae|both] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ldm.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
STEPS, CHECKPOINT_EVERY = 60, 5
COMMON = [f"train.max_steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1",
          "train.sample_every=0", "train.lr_warmup_steps=5", "train.keep_checkpoints=2"]  # fmt: skip
STAGES = {
    "vae": ["train_vae.py", "data.resolution=16", "data.train_size=256", "data.val_size=16",
            "model.block_out_channels=[8,16]", "model.norm_num_groups=4", "loss.disc_start=20",
            "loss.disc_channels=8", "train.batch_size=8", "train.ema_decay=0.9", "eval.num_samples=16",
            "eval.scale_samples=32"],
    "ldm": ["train_ldm.py", "data.resolution=16", "data.train_size=256", "data.val_size=8",
            "unet.block_out_channels=[32,32]", "unet.norm_num_groups=8", "text.hidden_size=32",
            "text.num_heads=2", "text.intermediate_size=64", "train.batch_size=8", "train.ema_decay=0.9",
            "sample.steps=2", "sample.grid_prompts=1", "sample.grid_seeds=1", "eval.num_samples=2",
            "eval.batch_size=2", "train.compile=false"],
}  # fmt: skip
WEIGHTS = {"vae": ["model/diffusion_pytorch_model.safetensors"],
           "ldm": ["model/unet/diffusion_pytorch_model.safetensors", "model/text_encoder/model.safetensors"]}  # fmt: skip


def last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    try:
        rows = read_metrics(path) if path.exists() else []
    except (ValueError, json.JSONDecodeError):  # a line being written
        return 0
    return rows[-1]["step"] if rows else 0


def run_and_kill(
    cmd: list[str], out: Path, target: int, mode: str, step_time: float, rng: random.Random
) -> str:
    """Start ``cmd``; SIGKILL it once it reaches step ``target`` (within the next step, or as a
    checkpoint write starts); return where the kill landed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = out / "checkpoints"
    while proc.poll() is None and last_step(out) < target:
        time.sleep(0.005)
    if proc.poll() is not None:
        raise RuntimeError(f"{cmd[1]} ended (code {proc.returncode}) before step {target}: no fault injected")
    if mode == "checkpoint":
        while proc.poll() is None and not any(checkpoints.glob(".tmp-step-*")):
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.02))
    else:
        time.sleep(rng.uniform(0, step_time))
    writing = any(checkpoints.glob(".tmp-step-*"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "checkpoint write" if writing else "training step"


def inject(stage: str, faults: int, tmp: Path, rng: random.Random) -> dict:
    script, *config = STAGES[stage]
    extra = [f"vae={make_autoencoder(tmp)}"] if stage == "ldm" else []
    base = [sys.executable, script, *config, *COMMON, *extra]
    straight, killed = tmp / f"{stage}-straight", tmp / f"{stage}-killed"
    subprocess.run([*base, f"output_dir={straight}"], cwd=ROOT, check=True, capture_output=True)
    step_time = statistics.median(r["train/step_time"] for r in read_metrics(straight / "metrics.jsonl"))
    targets = sorted(rng.sample(range(1, STEPS - CHECKPOINT_EVERY), faults))
    landed = []
    for target in targets:
        resume = ["--resume", "latest"] if (killed / "checkpoints" / "latest").exists() else []
        mode = rng.choice(["step", "checkpoint"])
        landed.append(
            run_and_kill([*base, f"output_dir={killed}", *resume], killed, target, mode, step_time, rng)
        )
    subprocess.run(
        [*base, f"output_dir={killed}", "--resume", "latest"], cwd=ROOT, check=True, capture_output=True
    )
    diffs = []
    for name in WEIGHTS[stage]:
        a, b = load_file(straight / name), load_file(killed / name)
        assert a.keys() == b.keys(), name
        diffs += [(a[k] - b[k]).abs().max().item() for k in a]
    return {
        "faults": len(landed),
        "during_checkpoint_write": landed.count("checkpoint write"),
        "kill_steps": targets,
        "max_abs_difference": max(diffs),
        "tensors": len(diffs),
        "equal": max(diffs) <= 1e-5,
    }


def make_autoencoder(tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_autoencoder  # the tests' tiny untrained f=2 autoencoder

    folder = tmp / "vae-model"
    if not folder.exists():
        tiny_autoencoder(scaling_factor=0.8).save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=10)
    parser.add_argument("--stage", choices=["ldm", "vae", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points (training uses seed 0)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fault_injection.json"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ["vae", "ldm"] if args.stage == "both" else [args.stage]:
            t0 = time.perf_counter()
            results[stage] = {
                **inject(stage, args.faults, Path(tmp), rng),
                "seconds": time.perf_counter() - t0,
            }
            r = results[stage]
            sys.stdout.write(
                f"{stage}: survived {r['faults']} SIGKILLs ({r['during_checkpoint_write']} during a checkpoint "
                f"write) at steps {r['kill_steps']}; final weights vs uninterrupted run: max |diff| "
                f"{r['max_abs_difference']:.2e} over {r['tensors']} tensors -> "
                f"{'EQUAL' if r['equal'] else 'DIFFERENT'} ({r['seconds']:.0f} s)\n"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["equal"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
