"""Caption accuracy of every sampler on a shapes model, at a fixed step count and guidance.

    python bench/sampler_accuracy.py [--run runs/ldm-shapes] [--steps 30] [--guidance G] [--samples 324]

Prints a Markdown table (sampler, accuracy, color, shape, background, seconds) and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ldm.core.config import load_config
from ldm.data import build_dataset
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.samplers import samplers_for
from ldm.train.config import LDMRunConfig
from ldm.train.evaluate import sample_accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/ldm-shapes"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--guidance", type=float, default=None, help="default: the run's sample.guidance_scale"
    )
    parser.add_argument("--samples", type=int, default=324)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampler_accuracy.json"))
    args = parser.parse_args(argv)
    cfg = load_config(LDMRunConfig, args.run / "config.yaml")
    guidance = cfg.sample.guidance_scale if args.guidance is None else args.guidance
    pipe = LatentDiffusionPipeline.from_pretrained(args.run / "model")
    val = build_dataset(cfg.data, "val", cfg.seed)
    captions = [val[i]["caption"] for i in range(min(args.samples, len(val)))]
    rows = {}
    lines = [
        f"| sampler ({args.steps} steps, guidance {guidance:g}) | caption accuracy | color | shape | background | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in samplers_for(pipe.objective.name):
        run_cfg = dataclasses.replace(
            cfg, sample=dataclasses.replace(cfg.sample, sampler=name, steps=args.steps)
        )
        t0 = time.perf_counter()
        scores = sample_accuracy(pipe, captions, guidance, run_cfg)
        scores["seconds"] = time.perf_counter() - t0
        rows[name] = scores
        lines.append(
            f"| `{name}` | {scores['accuracy']:.1%} | {scores['color']:.1%} | {scores['shape']:.1%} | "
            f"{scores['background']:.1%} | {scores['seconds']:.0f} |"
        )
        sys.stdout.write(lines[-1] + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"steps": args.steps, "guidance": guidance, "n": len(captions), "samplers": rows}, indent=2
        )
    )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
