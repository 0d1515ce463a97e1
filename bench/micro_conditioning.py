"""Is SDXL's micro-conditioning used? The same prompts and seeds sampled with different
``original_size`` / ``crops_coords_top_left`` from a model trained with ``conditioner=sdxl`` on data
whose crops varied (``configs/ldm/shapes-xl.yaml``: half the items drawn on a canvas of up to 40 px
and seen through a 32 px window).

    python bench/micro_conditioning.py [--run runs/ldm-shapes-xl] [--seeds 2]

In the training data, a canvas of S px seen from (top, left) shows the shape scaled by S / 32 and
moved by -(top, left). So if the model uses the time ids, the shape it draws should move and grow
the same way: for each condition the table gives the drawn shape's mean centroid and area (pixels
away from the image's border colour) and the mean pixel change from the default (32, (0, 0)), with
what the training data would predict for a shape at the mean position. Caption accuracy under each
condition says whether the prompt still holds (a shape cut by the window's edge can read wrong). Writes ``bench/results/micro_conditioning.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ldm.core.config import load_config
from ldm.data import build_dataset
from ldm.eval.shapes_reader import caption_accuracy
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.train.config import LDMRunConfig

CONDITIONS = {  # name: (original size, crop top-left)
    "default: 32 px, crop (0, 0)": ((32, 32), (0, 0)),
    "40 px canvas, crop (0, 0)": ((40, 40), (0, 0)),
    "40 px canvas, crop (4, 4)": ((40, 40), (4, 4)),
    "40 px canvas, crop (8, 8)": ((40, 40), (8, 8)),
    "40 px canvas, crop (8, 0)": ((40, 40), (8, 0)),
}


def shape_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (n, 3, H, W) in [-1, 1]: centroid (x, y) in pixels and area of the pixels more than
    0.4 (in [-1, 1] units, summed over RGB / 3) away from the median border colour."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]  # (n, 3, 1, 1)
    mask = ((images - background).abs().mean(dim=1) > 0.4).float()  # (n, H, W)
    h, w = mask.shape[-2:]
    ys, xs = torch.arange(h).float()[:, None], torch.arange(w).float()[None, :]
    area = mask.sum(dim=(-2, -1)).clamp(min=1)
    centroid = torch.stack([(mask * xs).sum((-2, -1)) / area, (mask * ys).sum((-2, -1)) / area], dim=-1)
    return centroid, mask.sum(dim=(-2, -1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/ldm-shapes-xl")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args(argv)
    run = Path(args.run)
    cfg = load_config(LDMRunConfig, run / "config.yaml", [])
    pipe = LatentDiffusionPipeline.from_pretrained(run / "model")
    val = build_dataset(cfg.data, "val", cfg.seed)
    captions = list(dict.fromkeys(val[i]["caption"] for i in range(len(val))))
    prompts = [c for c in captions for _ in range(args.seeds)]
    seeds = [k for _ in captions for k in range(args.seeds)]
    results, base, images_of = {}, None, {}
    for name, (original, crop) in CONDITIONS.items():
        images = pipe(
            prompts, seed=seeds, num_inference_steps=20, guidance_scale=args.guidance, sampler="dpm++2m",
            original_size=original, crops_coords_top_left=crop, output_type="pt_signed", progress=False,
        ).images  # fmt: skip
        centroid, area = shape_stats(images)
        images_of[name] = (images, centroid)
        right = caption_accuracy(images, prompts)["accuracy"]
        results[name] = {
            "centroid_x": round(float(centroid[:, 0].mean()), 2), "centroid_y": round(float(centroid[:, 1].mean()), 2),
            "area": round(float(area.mean()), 1), "caption_accuracy": round(100 * right, 1),
            "mean_abs_change_from_default": None if base is None else round(float((images - base).abs().mean()), 4),
        }  # fmt: skip
        if base is None:
            base, base_c, base_a = images, centroid.mean(0), float(area.mean())
        scale = original[0] / 32
        results[name]["predicted_centroid"] = [
            round(float(base_c[0]) * scale - crop[1], 2),
            round(float(base_c[1]) * scale - crop[0], 2),
        ]
        results[name]["predicted_area"] = round(base_a * scale**2, 1)
    # two crops of the same 40 px canvas, same prompts and seeds: the data predicts a shift of -(8, 8) px
    (a, ca), (b, cb) = images_of["40 px canvas, crop (0, 0)"], images_of["40 px canvas, crop (8, 8)"]
    shift = (cb - ca).mean(0)
    pair = {"mean_abs_change": round(float((b - a).abs().mean()), 4), "shift_x": round(float(shift[0]), 2),
            "shift_y": round(float(shift[1]), 2), "identical_images": int(sum(torch.equal(x, y) for x, y in zip(a, b, strict=True)))}  # fmt: skip
    out = Path("bench/results/micro_conditioning.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"run": str(run), "images_per_condition": len(prompts), "results": results, "crop_pair": pair},
            indent=2,
        )
    )
    lines = [
        f"{len(prompts)} images per condition ({len(captions)} validation captions x {args.seeds} seeds), "
        f"guidance {args.guidance}, DPM++ 2M 20 steps, {run}",
        "",
        "| condition | centroid (x, y) px | predicted | area px | predicted | mean change from default | caption accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        px, py = r["predicted_centroid"]
        change = (
            "" if r["mean_abs_change_from_default"] is None else f"{r['mean_abs_change_from_default']:.4f}"
        )
        lines.append(
            f"| {name} | ({r['centroid_x']:.2f}, {r['centroid_y']:.2f}) | ({px:.2f}, {py:.2f}) | {r['area']:.1f} | "
            f"{r['predicted_area']:.1f} | {change} | {r['caption_accuracy']:.1f}% |"
        )
    lines += [
        "",
        f"40 px canvas, crop (0, 0) -> (8, 8), same prompts and seeds: mean pixel change {pair['mean_abs_change']:.4f} "
        f"(in [-1, 1]), {pair['identical_images']} of {len(prompts)} images identical; shape centroid moved "
        f"({pair['shift_x']:+.2f}, {pair['shift_y']:+.2f}) px, the training data's shift is (-8, -8)",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
