"""The compression trade-off of latent diffusion (Rombach et al. 2022, section 4.1) on the shapes data.

    python bench/compression.py [--quick] [--factors 1 2 4 8] [--out runs/compression]

For each downsampling factor f, one autoencoder (f = 1: none, a pixel-space model) and one stage-2
model on the same data, with the same UNet and text encoder and equal wall-clock budgets for stage 2
on this machine:

1. stage 1: ``train_vae.py`` with ``configs/vae/shapes.yaml`` and log2(f) + 1 levels (4 latent
   channels), the same number of steps for every f; its validation PSNR is reported;
2. a short calibration run of stage 2 (the median ``train/step_time`` of its log) sets the steps that
   fill the budget;
3. stage 2: ``train_ldm.py`` with ``configs/ldm/shapes.yaml`` for those steps, then its evaluation
   at guidance 4 (caption accuracy and diversity);
4. sampling speed: images per second of the exported pipeline, 20 DPM++ 2M steps at guidance 4,
   decoding included, after one warm-up batch.

Writes ``<out>/compression.json`` and ``<out>/compression.png`` and prints a Markdown table.
The full run (2,000 autoencoder steps with the GAN from step 1,400, 5 minutes of stage 2 each,
216 evaluation images asked: 53 distinct captions x 4 seeds) took 2,347 s on 2 CPU cores on
2026-12-03; f = 4 learned the captions (90.6%), f = 1 and 2 were too slow to, and f = 8's
autoencoder lost the colors (README, "The compression trade-off"). ``--quick`` (400 autoencoder
steps without the GAN, 60 s of stage 2 each, 54 images: 27 captions x 2 seeds) is a smoke run of
the same code paths (735 s on 2026-12-03): too short for any f to learn the captions, its figures
are the throughputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


SETTINGS = {
    # autoencoder steps, GAN start, stage-2 seconds, evaluation images, seeds per caption
    "quick": {"vae_steps": 400, "disc_start": 10**9, "ldm_seconds": 60, "eval_images": 54, "seeds": 2},
    "full": {"vae_steps": 2000, "disc_start": 1400, "ldm_seconds": 300, "eval_images": 216, "seeds": 4},
}
CALIBRATION_STEPS = 12
BATCH = 64  # configs/ldm/shapes.yaml's


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repository root, its output to ``log``; returns its wall time (s)."""
    say("$ " + " ".join(cmd))
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def median_step_time(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["train/step_time"] for r in rows if "train/step_time" in r]
    return statistics.median(times[1:] if len(times) > 1 else times)  # (the first includes warm-up)


def autoencoder(f: int, out: Path, s: dict) -> tuple[str | None, float | None, float]:
    """(the autoencoder's folder, its validation PSNR, its training seconds); f = 1: none."""
    if f == 1:
        return None, None, 0.0
    levels = [16, 32, 32, 32, 32][: f.bit_length()]  # log2(f) + 1 levels
    folder = out / f"vae-f{f}"
    seconds = run(
        [sys.executable, "train_vae.py", f"output_dir={folder}", f"model.block_out_channels={levels}",
         f"train.max_steps={s['vae_steps']}", f"loss.disc_start={s['disc_start']}", "data.train_size=20000",
         "train.sample_every=0", f"train.checkpoint_every={s['vae_steps']}"],
        out / f"vae-f{f}.log",
    )  # fmt: skip
    results = json.loads((folder / "eval.json").read_text())
    return str(folder / "model"), results.get("psnr"), seconds


def stage2_args(f: int, vae: str | None, folder: Path) -> list[str]:
    first = ["autoencoder.kind=identity", "vae=null"] if vae is None else [f"vae={vae}"]
    return [sys.executable, "train_ldm.py", f"output_dir={folder}", *first, "preflight.samples=0",
            "train.compile=false", "train.sample_every=0"]  # fmt: skip


def sampling_speed(model: Path, prompts: list[str]) -> float:
    """Images per second: 20 DPM++ 2M steps at guidance 4 with decoding, after a warm-up batch."""
    from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(model)
    kw = {
        "num_inference_steps": 20,
        "guidance_scale": 4.0,
        "sampler": "dpm++2m",
        "output_type": "pt",
        "progress": False,
    }
    pipe(prompts[:4], seed=0, **kw)
    start = time.perf_counter()
    pipe(prompts, seed=0, **kw)
    return len(prompts) / (time.perf_counter() - start)


def measure(f: int, out: Path, s: dict) -> dict:
    vae, psnr, vae_seconds = autoencoder(f, out, s)
    calib = out / f"calib-f{f}"
    run([*stage2_args(f, vae, calib), f"train.max_steps={CALIBRATION_STEPS}", "train.log_every=4",
         "train.lr_warmup_steps=2", f"train.checkpoint_every={CALIBRATION_STEPS}", "eval.num_samples=0"],
        out / f"calib-f{f}.log")  # fmt: skip
    step = median_step_time(calib)
    steps = max(10, int(s["ldm_seconds"] / step))  # (a floor of 50 gave f=1 279 s of a 75 s budget)
    folder = out / f"ldm-f{f}"
    run([*stage2_args(f, vae, folder), f"train.max_steps={steps}", f"train.lr_warmup_steps={min(100, steps // 10)}",
         f"train.checkpoint_every={steps}", f"eval.num_samples={s['eval_images']}", f"eval.seeds_per_prompt={s['seeds']}",
         "eval.guidance_scales=[4]", "eval.bound_samples=32", "eval.bound_strata=20"],
        out / f"ldm-f{f}.log")  # fmt: skip
    results = json.loads((folder / "eval.json").read_text())
    row = next(r for r in results["guidance_sweep"] if r["guidance"] == 4.0)
    train_step = median_step_time(folder)
    from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, caption

    prompts = [caption(c, sh, b) for c in COLORS for sh in SHAPES for b in BACKGROUNDS][:36]
    side = 32 // f
    return {
        "f": f,
        "latent": "3x32x32 (pixels)" if f == 1 else f"4x{side}x{side}",
        "vae_psnr": psnr,
        "vae_seconds": round(vae_seconds, 1),
        "ldm_steps": steps,
        "ldm_train_seconds": round(steps * train_step, 1),
        "train_images_per_s": BATCH / train_step,
        "accuracy": row["accuracy"],
        "attributes": {k: row[k] for k in ("color", "shape", "background")},
        "images": row["n"],
        "diversity": row["diversity"],
        "samples_per_s": sampling_speed(folder / "model", prompts),
    }


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs = [str(r["f"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(fs, [100 * r["accuracy"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("downsampling factor f")
    axes[0].set_ylabel("caption accuracy at guidance 4 (%)")
    axes[0].set_ylim(0, 100)
    axes[1].plot(fs, [r["train_images_per_s"] for r in rows], marker="o", label="training images/s")
    axes[1].plot(fs, [r["samples_per_s"] for r in rows], marker="s", label="samples/s")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("downsampling factor f")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Equal stage-2 wall-clock budgets on this CPU (bench/compression.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def number(value: float | None, digits: int, unit: str = "") -> str:
    """``value`` to ``digits`` decimals, or "-" where there is none (f = 1's PSNR, one seed's diversity)."""
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def table(rows: list[dict]) -> str:
    head = ("| f | latent | autoencoder PSNR | stage-2 steps (s) | training images/s | caption accuracy | "
            "color / shape / background | diversity | samples/s |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [
        f"| {r['f']} | {r['latent']} | {number(r['vae_psnr'], 1, ' dB')} | "
        f"{r['ldm_steps']} ({r['ldm_train_seconds']:.0f}) | {r['train_images_per_s']:.0f} | {100 * r['accuracy']:.1f}% | "
        f"{' / '.join(f'{100 * v:.1f}' for v in r['attributes'].values())}% | "
        f"{number(r['diversity'], 3)} | {r['samples_per_s']:.1f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 15-minute version")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compression")
    args = parser.parse_args()
    if any(f < 1 or f & (f - 1) for f in args.factors):
        parser.error("--factors: powers of 2 (1, 2, 4, 8, 16)")
    s = SETTINGS["quick" if args.quick else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    rows = [measure(f, args.out, s) for f in args.factors]
    result = {"mode": "quick" if args.quick else "full", "settings": s, "rows": rows,
              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    (args.out / "compression.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "compression.png")
    say(table(rows))
    say(f"{result['seconds']:.0f} s in all; {args.out / 'compression.json'}, {args.out / 'compression.png'}")


if __name__ == "__main__":
    main()
