"""``ldm-sample``: text to images from the command line.

    ldm-sample --model runs/ldm-shapes/model --prompt "a red circle on a black background" \\
        [--negative-prompt TEXT] [-n 4] [--steps 30] [--guidance 7.5] [--sampler NAME] [--seed 0] \\
        [--size 32] [--device cpu] [--dtype float32] [--lora PATH] [--lora-scale 1] [--vae PATH] \\
        [--embeddings PATH] [--tiled-decode] --out samples/

Writes one PNG per image (``<out>/<prompt index>-<image index>.png``) and ``<out>/grid.png``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from ldm.cli.common import CliParser, int_at_least, setup_logging, user_errors
from ldm.core.errors import MissingFileError, UserError
from ldm.core.images import save_grid
from ldm.pipelines.samplers import SAMPLERS, cli_sampler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def check_device(name: str) -> None:
    """Raise ``UserError`` for a device name torch does not know, or a CUDA device on a machine without one."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA device; use --device cpu")


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="ldm-sample", description="Generate images from text prompts.")
    parser.add_argument(
        "--model", required=True, help="an exported pipeline folder (ours or Stable Diffusion)"
    )
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("-n", "--num-images", type=int_at_least(1), default=4, help="images per prompt")
    parser.add_argument("--steps", type=int_at_least(1), default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument(
        "--sampler", default=None, choices=list(SAMPLERS),
        help="default: dpm++2m for DDPM models, flow-euler for rectified-flow ones",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size", type=int_at_least(1), default=None, help="image side in pixels (default: the model's)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--lora", default=None, help="LoRA folder or .safetensors to apply")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--vae", default=None, help="another autoencoder folder with the same latents")
    parser.add_argument(
        "--embeddings",
        default=None,
        help="textual-inversion file or folder (a run's embeddings/): its tokens become words of the prompt",
    )
    parser.add_argument("--tiled-decode", action="store_true", help="decode in tiles (large images)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let model and LoRA weights be pickle files (.bin), read with weights_only=True",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    setup_logging()
    from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

    with user_errors(parser):
        check_device(args.device)
        if args.out.exists() and not args.out.is_dir():
            raise UserError(f"--out {args.out}: that is a file; give a folder for the images")
        for flag, value in (("--lora", args.lora), ("--embeddings", args.embeddings)):
            if value and not Path(value).exists():
                raise MissingFileError(f"{flag} {value}: no such file or folder")
        pipe = LatentDiffusionPipeline.from_pretrained(
            args.model,
            device=args.device,
            dtype=DTYPES[args.dtype],
            vae=args.vae,
            allow_pickle=args.allow_pickle,
        )
        args.sampler = cli_sampler(args.sampler, pipe.objective.name)
        if args.size is not None and args.size % pipe.vae_scale_factor:
            raise UserError(
                f"--size {args.size}: give a multiple of the autoencoder's factor {pipe.vae_scale_factor}"
            )
        if args.embeddings:
            pipe.load_textual_inversion(args.embeddings)
        if args.lora:
            pipe.load_lora_weights(args.lora, scale=args.lora_scale, allow_pickle=args.allow_pickle)
        if args.tiled_decode:
            pipe.enable_vae_tiling()
        out = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_images_per_prompt=args.num_images,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            sampler=args.sampler,
            seed=args.seed,
            height=args.size,
            width=args.size,
            output_type="pt_signed",
        )
    args.out.mkdir(parents=True, exist_ok=True)
    from ldm.core.images import make_grid

    for i, image in enumerate(out.images):
        prompt_index, k = divmod(i, args.num_images)
        make_grid(image[None], nrow=1, pad=0).save(
            args.out / f"{prompt_index:02d}-{k:02d}-{_slug(args.prompt[prompt_index])}.png"
        )
    save_grid(out.images, args.out / "grid.png", nrow=args.num_images)
    sys.stdout.write(f"wrote {len(out.images)} images and grid.png to {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
