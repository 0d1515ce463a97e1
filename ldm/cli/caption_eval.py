"""Caption accuracy of a model (and LoRA) on the shapes captions, optionally with a new color.

    python -m ldm.cli.caption_eval --model runs/ldm-shapes/model [--lora runs/ldm-orange/lora]
        [--vae runs/vae-orange/model]
        [--color orange=240,140,30] [--seeds 10] [--val 324] [--steps 20] [--guidance 4]
        [--sampler NAME] [--out eval-orange.json]

Scores two prompt sets: every "{color} {shape} on a {background} background" of the new color
(x ``--seeds`` seeds), and the first ``--val`` captions of the shapes validation split; images are
read by ``ldm.eval.shapes_reader`` with the palette extended by the new color.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ldm.cli.common import CliParser, int_at_least, user_errors
from ldm.cli.export_folder import parse_color
from ldm.core.errors import MissingFileError
from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, ShapesDataset, caption
from ldm.eval.shapes_reader import caption_accuracy
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.samplers import SAMPLERS, cli_sampler


def score(
    pipe: LatentDiffusionPipeline, captions: list[str], colors: dict, args: argparse.Namespace
) -> dict[str, float | int]:
    """One image per caption (seed = its position), read back and compared with the caption."""
    images = []
    for start in range(0, len(captions), args.batch):
        chunk = captions[start : start + args.batch]
        out = pipe(chunk, num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                   seed=list(range(start, start + len(chunk))), output_type="pt_signed", progress=False)  # fmt: skip
        images.append(out.images)
    return caption_accuracy(torch.cat(images), captions, colors=colors)


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="python -m ldm.cli.caption_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/ldm-shapes/model")
    parser.add_argument("--lora", default=None, help="LoRA folder or .safetensors to load on top")
    parser.add_argument("--vae", default=None, help="another autoencoder folder (e.g. a decoder fine-tune)")
    parser.add_argument("--color", type=parse_color, default=None, help="NAME=R,G,B of the new color")
    parser.add_argument("--seeds", type=int_at_least(1), default=10, help="images per new-color caption")
    parser.add_argument(
        "--val", type=int_at_least(0), default=324, help="validation captions of the original colors"
    )
    parser.add_argument("--resolution", type=int_at_least(8), default=32)
    parser.add_argument("--steps", type=int_at_least(1), default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument(
        "--sampler", default=None, choices=list(SAMPLERS),
        help="default: dpm++2m for DDPM models, flow-euler for rectified-flow ones",
    )  # fmt: skip
    parser.add_argument("--batch", type=int_at_least(1), default=108)
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)

    with user_errors(parser):
        if args.out is not None and not args.out.parent.is_dir():
            raise MissingFileError(f"--out {args.out}: the folder {args.out.parent} does not exist")
        if args.lora and not Path(args.lora).exists():
            raise MissingFileError(f"--lora {args.lora}: no such file or folder")
        pipe = LatentDiffusionPipeline.from_pretrained(args.model, vae=args.vae)
        args.sampler = cli_sampler(args.sampler, pipe.objective.name)
        if args.lora:
            pipe.load_lora_weights(args.lora)
    colors = dict(COLORS)
    results: dict[str, object] = {"model": args.model, "lora": args.lora, "vae": args.vae, "steps": args.steps,
                                  "guidance": args.guidance, "sampler": args.sampler}  # fmt: skip
    if args.color is not None:
        name, rgb = args.color
        colors[name] = rgb
        new = [caption(name, s, b) for s in SHAPES for b in BACKGROUNDS for _ in range(args.seeds)]
        results[f"{name}_captions"] = score(pipe, new, colors, args)
    if args.val:
        val = ShapesDataset(args.val, args.resolution, split="val")
        results["original_captions"] = score(
            pipe, [val.spec(i).caption for i in range(args.val)], colors, args
        )
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
