"""Caption accuracy against sampling steps for models trained with different objectives, in one run.

    python bench/objectives.py [--runs runs/ldm-shapes runs/ldm-flow-shapes] [--steps 4 10 20]
        [--guidance 2 4] [--samples 324]

For each run folder (a ``train_ldm.py`` output: ``config.yaml`` and ``model/``), guidance scale and
step count, every sampler that fits the model's objective samples the same validation captions with
the same seeds; the tables give each sampler's caption accuracy, and the best sampler of each model
per guidance scale and step count side by side.
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
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--samplers", nargs="*", default=None, help="only these (default: all that fit)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/objectives.json"))
    args = parser.parse_args(argv)
    results: dict = {"steps": args.steps, "guidance": args.guidance, "runs": {}}
    for run in args.runs:
        cfg = load_config(LDMRunConfig, run / "config.yaml")
        pipe = LatentDiffusionPipeline.from_pretrained(run / "model")
        val = build_dataset(cfg.data, "val", cfg.seed)
        captions = [val[i]["caption"] for i in range(min(args.samples, len(val)))]
        names = [s for s in samplers_for(pipe.objective.name) if args.samplers is None or s in args.samplers]
        rows: dict = {}
        for name in names:
            for guidance in args.guidance:
                for steps in args.steps:
                    sample = dataclasses.replace(cfg.sample, sampler=name, steps=steps)
                    t0 = time.perf_counter()
                    scores = sample_accuracy(
                        pipe, captions, guidance, dataclasses.replace(cfg, sample=sample)
                    )
                    scores["seconds"] = round(time.perf_counter() - t0, 1)
                    rows.setdefault(name, {}).setdefault(guidance, {})[steps] = scores
                    sys.stdout.write(
                        f"{run.name} {name} guidance {guidance:g} {steps} steps: {scores['accuracy']:.1%} "
                        f"({scores['seconds']} s)\n"
                    )
        results["runs"][str(run)] = {"objective": pipe.objective.name, "n": len(captions), "samplers": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    sys.stdout.write(table(results) + "\n")
    return 0


def table(results: dict) -> str:
    """Every sampler's accuracy (rows: model, sampler, guidance; columns: steps), then the best sampler
    of each model per guidance and step count."""
    steps, runs = results["steps"], results["runs"]
    head = " | ".join(f"{s} steps" for s in steps)
    lines = [
        f"| model (objective) | sampler | guidance | {head} |",
        "| --- | --- | --- |" + " --- |" * len(steps),
    ]
    for run, r in runs.items():
        for name, by_guidance in r["samplers"].items():
            for guidance, by_steps in by_guidance.items():
                cells = " | ".join(f"{by_steps[s]['accuracy']:.1%}" for s in steps)
                lines.append(f"| `{Path(run).name}` ({r['objective']}) | `{name}` | {guidance:g} | {cells} |")
    lines += ["", f"| guidance | model | {head} |", "| --- | --- |" + " --- |" * len(steps)]
    for guidance in results["guidance"]:
        for run, r in runs.items():
            cells = []
            for s in steps:
                name, best = max(
                    ((n, g[guidance][s]["accuracy"]) for n, g in r["samplers"].items()), key=lambda x: x[1]
                )
                cells.append(f"{best:.1%} (`{name}`)")
            lines.append(
                f"| {guidance:g} | `{Path(run).name}` ({r['objective']}) | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
