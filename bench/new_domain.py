"""A first fine-tune on a new domain, end to end: grayscale patterns captioned with words the shapes
demo model never saw, and a reader that scores what a model draws for them.

    python bench/new_domain.py make data/patterns [--count 1200] [--resolution 32]
    python bench/new_domain.py check data/patterns           # the reader on the folder's own images
    python bench/new_domain.py score runs/ldm-patterns/model [--seeds 16] [--steps 20] [--guidance 4]

The domain: 4 patterns (``horizontal stripes``, ``vertical stripes``, ``checkerboard``, ``plain``)
x 2 tones (``dark``, ``light``) = 8 captions such as "dark vertical stripes", of random period,
phase and contrast, with sensor-like noise, gray (R = G = B). None of these words is in a shapes
caption, and the shapes autoencoder, trained on flat saturated colours, cannot draw gray textures.

``score`` loads the model with plain diffusers (``StableDiffusionPipeline.from_pretrained``,
DPM-Solver++ from its scheduler config), draws every caption under ``--seeds`` seeds and reads each
image back with ``read_pattern``, which knows nothing of the model: the tone from the mean gray
level, the pattern from where the power of the image's 2-D spectrum lies (on the vertical axis:
horizontal stripes; horizontal axis: vertical stripes; off the axes: checkerboard; too little
variance: plain). Chance is 1/8.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PATTERNS = ("horizontal stripes", "vertical stripes", "checkerboard", "plain")
TONES = {"dark": (25.0, 105.0), "light": (150.0, 230.0)}  # gray levels of the two stripe colours
CAPTIONS = [f"{tone} {pattern}" for pattern in PATTERNS for tone in TONES]
NOISE_STD = 5.0  # gray levels
PLAIN_MAX_STD = 14.0  # a picture whose gray level varies less than this (std) reads as "plain"
MIN_AXIS_SHARE = 0.5  # the winning part of the spectrum must hold at least this share of the power


def render_pattern(pattern: str, tone: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size) gray image, float in [0, 255]."""
    lo, hi = TONES[tone]
    lo, hi = lo + rng.uniform(-10, 10), hi + rng.uniform(-10, 10)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(size / 4, size / 2)  # 8 to 16 px at 32 px: 2 to 4 stripes a side

    def square(coord: np.ndarray) -> np.ndarray:  # 1 / 0 square wave of random phase
        return (((coord / period) + rng.uniform(0, 1)) % 1.0 < 0.5).astype(np.float64)

    if pattern == "horizontal stripes":
        mask = square(yy)
    elif pattern == "vertical stripes":
        mask = square(xx)
    elif pattern == "checkerboard":
        mask = np.logical_xor(square(xx) > 0, square(yy) > 0).astype(np.float64)
    else:  # plain: the mean of the two tones, under a faint illumination gradient
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size - 0.5
        return np.clip((lo + hi) / 2 + 12 * ramp + rng.normal(0, NOISE_STD, (size, size)), 0, 255)
    image = lo + (hi - lo) * mask
    return np.clip(image + rng.normal(0, NOISE_STD, (size, size)), 0, 255)


def read_pattern(image: np.ndarray) -> str:
    """Caption of one image, (H, W, 3) or (H, W) with values in [0, 255]; "none" when no pattern fits."""
    gray = image.astype(np.float64)
    gray = gray.mean(axis=-1) if gray.ndim == 3 else gray
    tone = "dark" if gray.mean() < 128 else "light"
    x = gray - gray.mean()
    if x.std() < PLAIN_MAX_STD:
        return f"{tone} plain"
    power = np.abs(np.fft.fft2(x)) ** 2  # (H, W): [ky, kx]
    power[0, 0] = 0.0
    along_y = power[1:, 0].sum()  # kx = 0: the image varies along y only -> horizontal stripes
    along_x = power[0, 1:].sum()  # ky = 0: vertical stripes
    off_axis = power[1:, 1:].sum()  # both: checkerboard
    parts = {"horizontal stripes": along_y, "vertical stripes": along_x, "checkerboard": off_axis}
    best = max(parts, key=parts.get)
    if parts[best] < MIN_AXIS_SHARE * power.sum():
        return "none"
    return f"{tone} {best}"


def make(folder: Path, count: int, resolution: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "metadata.jsonl", "w") as meta:
        for i in range(count):
            caption = CAPTIONS[i % len(CAPTIONS)]
            tone, pattern = caption.split(" ", 1)
            gray = render_pattern(pattern, tone, resolution, rng).round().astype(np.uint8)
            name = f"{i:05d}.png"
            Image.fromarray(np.stack([gray] * 3, axis=-1)).save(folder / name)
            meta.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    print(f"wrote {count} images and metadata.jsonl to {folder}")  # noqa: T201


def accuracy(images: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    reads = [read_pattern(im) for im in images]
    right = [r == c for r, c in zip(reads, captions, strict=True)]
    tone = [r.split(" ", 1)[0] == c.split(" ", 1)[0] for r, c in zip(reads, captions, strict=True)]
    pattern = [r.split(" ", 1)[-1] == c.split(" ", 1)[1] for r, c in zip(reads, captions, strict=True)]
    return {"n": len(images), "accuracy": float(np.mean(right)), "tone": float(np.mean(tone)),
            "pattern": float(np.mean(pattern))}  # fmt: skip


def check(folder: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    images = [np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in rows]
    return accuracy(images, [r["text"] for r in rows])


def score(model: Path, seeds: int, steps: int, guidance: float) -> dict[str, float]:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    captions = [c for c in CAPTIONS for _ in range(seeds)]
    images = []
    for start in range(0, len(captions), 32):
        chunk = captions[start : start + 32]
        generator = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                   output_type="np").images  # fmt: skip
        images += list((out * 255).round())  # (H, W, 3) in [0, 255]
    return {"model": str(model), "steps": steps, "guidance": guidance, **accuracy(images, captions)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make", help="write the folder")
    p.add_argument("folder", type=Path)
    p.add_argument("--count", type=int, default=1200)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("check", help="the reader on a folder's own images")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("score", help="caption accuracy of a pipeline folder, loaded by plain diffusers")
    p.add_argument("model", type=Path)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args.folder, args.count, args.resolution, args.seed)
        return 0
    result = (
        check(args.folder)
        if args.command == "check"
        else score(args.model, args.seeds, args.steps, args.guidance)
    )
    print(json.dumps(result))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
