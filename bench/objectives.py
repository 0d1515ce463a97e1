"""Caption accuracy against sampling steps for models trained with different objectives, in one run.

    python bench/objectives.py [--runs runs/ldm-shapes runs/ldm-flow-shapes] [--steps 4 10 20]
        [--samples 324] [--guidance G]

For each run folder (a ``train_ldm.py`` output: ``config.yaml`` and ``model/``) and each step count,
every sampler that fits the model's objective samples the same validation captions with the same
seeds; the table gives each sampler's caption accuracy and marks the best per model and step count.
Writes ``bench/results/objectives.json`` and prints a Markdown table.
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
    parser.add_argument(
        "--runs", type=Path, nargs="+", default=[Path("runs/ldm-shapes"), Path("runs/ldm-flow-shapes")]
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 10, 20])
    parser.add_argument("--samples", type=int, default=324)
    parser.add_argument(
        "--guidance", type=float, default=None, help="default: each run's sample.guidance_scale"
    )
    parser.add_argument("--samplers", nargs="*", default=None, help="only these (default: all that fit)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/objectives.json"))
    args = parser.parse_args(argv)
    results: dict = {"steps": args.steps, "runs": {}}
    for run in args.runs:
        cfg = load_config(LDMRunConfig, run / "config.yaml")
        guidance = cfg.sample.guidance_scale if args.guidance is None else args.guidance
        pipe = LatentDiffusionPipeline.from_pretrained(run / "model")
        val = build_dataset(cfg.data, "val", cfg.seed)
        captions = [val[i]["caption"] for i in range(min(args.samples, len(val)))]
        names = [s for s in samplers_for(pipe.objective.name) if args.samplers is None or s in args.samplers]
        rows: dict = {}
        for name in names:
            for steps in args.steps:
                run_cfg = dataclasses.replace(
                    cfg, sample=dataclasses.replace(cfg.sample, sampler=name, steps=steps)
                )
                t0 = time.perf_counter()
                scores = sample_accuracy(pipe, captions, guidance, run_cfg)
                scores["seconds"] = round(time.perf_counter() - t0, 1)
                rows.setdefault(name, {})[steps] = scores
                sys.stdout.write(
                    f"{run.name} {name} {steps} steps: {scores['accuracy']:.1%} ({scores['seconds']} s)\n"
                )
        results["runs"][str(run)] = {
            "objective": pipe.objective.name,
            "guidance": guidance,
            "n": len(captions),
            "samplers": rows,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    sys.stdout.write(table(results) + "\n")
    return 0


def table(results: dict) -> str:
    """One row per (model, sampler), one column per step count; the best sampler per column in bold."""
    steps = results["steps"]
    lines = [
        "| model (objective) | sampler | " + " | ".join(f"{s} steps" for s in steps) + " |",
        "| --- | --- | " + " | ".join("---" for _ in steps) + " |",
    ]
    for run, r in results["runs"].items():
        best = {s: max(v[s]["accuracy"] for v in r["samplers"].values()) for s in steps}
        for name, by_steps in r["samplers"].items():
            cells = []
            for s in steps:
                acc = by_steps[s]["accuracy"]
                cells.append(f"**{acc:.1%}**" if acc == best[s] else f"{acc:.1%}")
            lines.append(f"| `{Path(run).name}` ({r['objective']}) | `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
