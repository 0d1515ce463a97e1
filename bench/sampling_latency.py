"""Sampling latency of LatentDiffusionPipeline against diffusers' StableDiffusionPipeline, in one run.

Both load the same exported model, run the same sampler, steps, guidance, batch and initial
latents; calls alternate (ours, theirs, ours, ...) after a warm-up so that both see the same
machine state, and the ratio of medians is printed (below 1.0: ours is faster).

    python bench/sampling_latency.py [--model runs/ldm-shapes/model] [--sampler dpm++2m] [--steps 30]
        [--batch 8] [--guidance 4] [--repeats 5] [--out bench/results/sampling_latency.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.samplers import SAMPLERS, make_scheduler

PROMPT = "a red circle on a black background"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/ldm-shapes/model")
    parser.add_argument("--sampler", default="dpm++2m", choices=list(SAMPLERS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampling_latency.json"))
    args = parser.parse_args(argv)

    # the same attention kernels as diffusers' default (SDPA), so that only the pipelines differ
    ours = LatentDiffusionPipeline.from_pretrained(args.model, device=args.device, attention="sdpa")
    theirs = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None).to(args.device)
    theirs.scheduler = make_scheduler(args.sampler, ours.scheduler_config)
    theirs.set_progress_bar_config(disable=True)
    prompts = [PROMPT] * args.batch
    shape = (
        args.batch,
        ours.unet.config.in_channels,
        ours.unet.config.sample_size,
        ours.unet.config.sample_size,
    )
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(args.device)

    def run_ours() -> torch.Tensor:
        return ours(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                    latents=latents, output_type="pt", progress=False).images  # fmt: skip

    def run_theirs() -> torch.Tensor:
        return theirs(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, latents=latents,
                      output_type="pt").images  # fmt: skip

    def timed(fn) -> float:
        cuda = torch.device(args.device).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    max_diff = (run_ours() - run_theirs().to("cpu")).abs().max().item()  # warm-up and parity
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):
        times["ours"].append(timed(run_ours))
        times["diffusers"].append(timed(run_theirs))
    med = {k: statistics.median(v) for k, v in times.items()}
    results = {
        "model": args.model, "sampler": args.sampler, "steps": args.steps, "batch": args.batch,
        "guidance": args.guidance, "device": args.device, "median_s": med, "times_s": times,
        "ratio": med["ours"] / med["diffusers"], "max_abs_image_diff": max_diff,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.write(
        f"sampling {args.batch} images, {args.sampler} x {args.steps} steps, guidance {args.guidance} on {args.device}: "
        f"ours {med['ours']:.3f} s, diffusers {med['diffusers']:.3f} s, ratio {results['ratio']:.3f}x "
        f"(max image difference {max_diff:.1e})\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
