"""Classifier guidance (Dhariwal & Nichol 2021) against classifier-free guidance (Ho & Salimans 2022)
on the shapes demo model, by caption accuracy and diversity.

    python train_classifier.py                          # runs/classifier-shapes (a few minutes)
    python bench/classifier_guidance.py [--model runs/ldm-shapes/model] [--classifier runs/classifier-shapes/model]
        [--scales 0 1 2 4 8] [--cfg 1 2 4 8] [--seeds 6] [--sampler dpm++2m] [--out runs/classifier-guidance.json]

- The unconditional model: the demo model's unconditional prediction (the empty prompt, guidance 1;
  condition dropout trained it on 10% of the steps), guided by the classifier toward each caption's
  color, shape and background at each classifier scale (0: unguided).
- Classifier-free guidance: the same model conditioned on the caption at each CFG scale, unguided by
  the classifier; and both at once: the best CFG scale with the classifier at 1 and 2.
- The classifier's own accuracy on noised validation latents per band of t (its ``classifier.json``).

54 captions (every color, shape and background) x ``--seeds`` seeds per row. Caption accuracy: the
pixel reader (``ldm.eval.shapes_reader``) reads color, shape and background all as captioned;
diversity: mean RMS pixel distance between the seeds of a caption. Prints a Markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, caption
from ldm.eval.quality import pairwise_diversity
from ldm.eval.shapes_reader import caption_accuracy, parse_caption
from ldm.models.classifier import NoiseConditionalClassifier
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

ROOT = Path(__file__).resolve().parent.parent


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


CAPTIONS = [caption(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS]


def sweep_row(pipe, prompts, captions, seeds, name, batch=108, **kw) -> dict:
    images = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        extra = {}
        if "class_labels" in kw:
            extra["class_labels"] = kw["class_labels"][i : i + batch]
        rest = {k: v for k, v in kw.items() if k != "class_labels"}
        result = pipe(prompts[i : i + batch], seed=seeds[i : i + batch], output_type="pt_signed", progress=False,
                   **rest, **extra)  # fmt: skip
        images.append(result.images)
    x = torch.cat(images)
    scores = caption_accuracy(x, captions)
    row = {"method": name, **{k: scores[k] for k in ("accuracy", "color", "shape", "background")},
           "diversity": pairwise_diversity(x, captions), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    say(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "runs" / "ldm-shapes" / "model"))
    parser.add_argument("--classifier", default=str(ROOT / "runs" / "classifier-shapes" / "model"))
    parser.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--cfg", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpm++2m")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "classifier-guidance.json")
    args = parser.parse_args()
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    classifier = NoiseConditionalClassifier.from_pretrained(args.classifier)  # (loaded once)
    captions = [c for c in CAPTIONS for _ in range(args.seeds)]
    seeds = [k for _ in CAPTIONS for k in range(args.seeds)]
    labels = [dict(zip(("color", "shape", "background"), parse_caption(c), strict=True)) for c in captions]
    common = {"num_inference_steps": args.steps, "sampler": args.sampler}
    rows = []
    for s in args.scales:  # the unconditional model, guided by the classifier
        rows.append(sweep_row(pipe, [""] * len(captions), captions, seeds, f"unconditional + classifier s={s:g}",
                              guidance_scale=1.0, classifier=classifier, class_labels=labels,
                              classifier_scale=s, **common))  # fmt: skip
    cfg_rows = [
        sweep_row(pipe, captions, captions, seeds, f"CFG w={w:g}", guidance_scale=w, **common)
        for w in args.cfg
    ]
    rows += cfg_rows
    best = max(cfg_rows, key=lambda r: (r["accuracy"], r["diversity"]))
    w = float(best["method"].split("=")[1])
    for s in (1, 2):  # both at once
        rows.append(sweep_row(pipe, captions, captions, seeds, f"CFG w={w:g} + classifier s={s}", guidance_scale=w,
                              classifier=classifier, class_labels=labels, classifier_scale=s, **common))  # fmt: skip
    clf_json = Path(args.classifier).parent / "classifier.json"
    bands = json.loads(clf_json.read_text())["per_t_band"] if clf_json.exists() else None
    result = {"model": args.model, "classifier": args.classifier, "seeds": args.seeds, "steps": args.steps,
              "sampler": args.sampler, "rows": rows, "classifier_per_t_band": bands}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    say("| method | caption accuracy | color | shape | background | diversity |\n|---|---|---|---|---|---|")
    for r in rows:
        say(f"| {r['method']} | {100 * r['accuracy']:.1f}% | {100 * r['color']:.1f}% | {100 * r['shape']:.1f}% | "
              f"{100 * r['background']:.1f}% | {r['diversity']:.3f} |")  # fmt: skip
    if bands:
        say("| t band | color | shape | background | all three |\n|---|---|---|---|---|")
        for b in bands:
            say(f"| [{b['t_lo']}, {b['t_hi']}) | {100 * b['color']:.1f}% | {100 * b['shape']:.1f}% | "
                  f"{100 * b['background']:.1f}% | {100 * b['all']:.1f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
