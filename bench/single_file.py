"""Export a pipeline folder to single files (fp32 and fp16) and compare images, offline.

    python bench/single_file.py runs/ldm-shapes/model [--out /tmp/single-file]

Prints the two file sizes, and the largest pixel difference (0..1) between the folder's images and
(1) diffusers' ``from_single_file`` on the fp32 file (configs from the folder), (2)
``LatentDiffusionPipeline.from_pretrained`` on the fp32 file (configs from its metadata), same
latents, 3 DDIM-type steps.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/single-file"))
    args = parser.parse_args()
    ours = LatentDiffusionPipeline.from_pretrained(args.model, channels_last=False)
    full = ours.save_single_file(args.out / "model.safetensors")
    half = ours.save_single_file(args.out / "model-fp16.safetensors", "fp16")
    sys.stdout.write(f"fp32 {full.stat().st_size / 1e6:.1f} MB, fp16 {half.stat().st_size / 1e6:.1f} MB "
          f"(ratio {half.stat().st_size / full.stat().st_size:.4f})\n")  # fmt: skip

    cls = StableDiffusionXLPipeline if ours.is_sdxl else StableDiffusionPipeline
    extra = {} if ours.is_sdxl else {"safety_checker": None, "requires_safety_checker": False}
    folder = cls.from_pretrained(args.model, **extra)
    single = cls.from_single_file(str(full), config=str(args.model), local_files_only=True, **extra)
    side = folder.unet.config.sample_size
    latents = torch.randn(
        (2, folder.unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(0)
    )

    def images(pipe) -> torch.Tensor:
        out = pipe(["a red circle", "a blue square"], num_inference_steps=3, latents=latents.clone(),
                   generator=torch.Generator().manual_seed(1), output_type="pt")  # fmt: skip
        return out.images

    diff = (images(single) - images(folder)).abs().max()
    sys.stdout.write(f"diffusers from_single_file vs folder: max |diff| {diff:.2e}\n")
    again = LatentDiffusionPipeline.from_pretrained(full, channels_last=False)
    a = ours(
        ["a red circle", "a blue square"], seed=0, num_inference_steps=3, output_type="pt", progress=False
    )
    b = again(
        ["a red circle", "a blue square"], seed=0, num_inference_steps=3, output_type="pt", progress=False
    )
    diff = (a.images - b.images).abs().max()
    sys.stdout.write(f"LatentDiffusionPipeline from the file vs folder: max |diff| {diff:.2e}\n")


if __name__ == "__main__":
    main()
