"""Convert between a diffusers pipeline folder and a single-file checkpoint (original SD layout).

    ldm-export MODEL --single-file OUT.safetensors [--dtype fp16|bf16|fp32] [--config FOLDER]
    ldm-export FILE.safetensors --folder OUT [--config FOLDER]

MODEL: a pipeline folder (ours or a diffusers Stable Diffusion 1.x/2.x/SDXL one) or a single file.
``--config``: a diffusers folder with the architecture's configs, for single files ldm did not write
(see ``ldm.pipelines.single_file``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ldm.cli.common import CliParser, setup_logging, user_errors
from ldm.core.errors import UserError
from ldm.pipelines.single_file import DTYPES

logger = logging.getLogger("ldm")


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="ldm-export", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a pipeline folder or a single-file .safetensors")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--single-file", type=Path, metavar="OUT.safetensors", help="write the original layout")
    out.add_argument("--folder", type=Path, metavar="OUT", help="write a diffusers pipeline folder")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights of the single file")
    parser.add_argument("--config", type=Path, help="diffusers configs for a single file ldm did not write")
    args = parser.parse_args(argv)
    setup_logging()
    with user_errors(parser):
        from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

        if args.config is not None and args.model.suffix != ".safetensors":
            raise UserError(
                "--config is for a single-file MODEL (.safetensors); a folder has its own configs"
            )
        pipe = LatentDiffusionPipeline.from_pretrained(args.model, config=args.config, channels_last=False)
        if args.single_file is not None:
            path = pipe.save_single_file(args.single_file, args.dtype)
            logger.info("wrote %s (%s, %.1f MB)", path, args.dtype, os.path.getsize(path) / 1e6)
        else:
            logger.info("wrote %s", pipe.save_pretrained(args.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
