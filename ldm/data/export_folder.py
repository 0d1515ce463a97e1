"""Write shapes items as an image folder with ``metadata.jsonl``, the layout ``data.dataset=folder`` reads.

    python -m ldm.data.export_folder DIR [--count 36] [--resolution 32] [--mixed] [--corrupt 1]
        [--color orange=240,140,30]

``--mixed`` saves the images at assorted sizes, modes and formats (RGB PNG, RGBA PNG, L PNG,
palette GIF, CMYK JPEG, WebP); ``--corrupt N`` adds N unreadable files, to see how a
training run reports them. ``--color NAME=R,G,B`` paints every shape in a new color (the
captions say so), e.g. to teach a trained model a color it has never seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from PIL import Image

from ldm.data.shapes import COLORS, ShapesDataset, render
from ldm.errors import UserError

# (mode, extension, size multiplier): the mix --mixed cycles through
MIXED_FORMATS = [
    ("RGB", "png", 1.0),
    ("RGBA", "png", 1.5),
    ("L", "png", 2.0),
    ("P", "gif", 1.25),
    ("CMYK", "jpg", 3.0),
    ("RGB", "webp", 0.75),
    ("RGB", "jpg", 2.5),
]


def export_folder(
    root: Path,
    count: int,
    resolution: int = 32,
    seed: int = 0,
    split: str = "train",
    mixed: bool = False,
    corrupt: int = 0,
    color: tuple[str, tuple[int, int, int]] | None = None,
) -> Path:
    """Write ``count`` shapes items under ``root`` (half in a subfolder) and their captions;
    ``color`` = (name, rgb) repaints every shape in that color."""
    root = Path(root)
    (root / "more").mkdir(parents=True, exist_ok=True)
    dataset = ShapesDataset(count, resolution, seed, split)
    rows = []
    for i in range(count):
        spec, pixels = dataset.image(i)  # (3, R, R) uint8
        if color is not None:
            spec = dataclasses.replace(spec, color=color[0])
            pixels = render([spec], resolution, colors={**COLORS, color[0]: color[1]})[0]
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        mode, ext, scale = MIXED_FORMATS[i % len(MIXED_FORMATS)] if mixed else ("RGB", "png", 1.0)
        if scale != 1.0:
            side = round(resolution * scale)
            image = image.resize((side, round(side * (1.0 + 0.25 * (i % 3)))), Image.Resampling.LANCZOS)
        image = image.quantize(64) if mode == "P" else image.convert(mode)
        name = f"{'more/' if i % 2 else ''}{i:05d}.{ext}"
        image.save(root / name)
        rows.append({"file_name": name, "text": spec.caption})
    for k in range(corrupt):
        (root / f"corrupt-{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def parse_color(text: str) -> tuple[str, tuple[int, int, int]]:
    """``"orange=240,140,30"`` -> ``("orange", (240, 140, 30))``."""
    try:
        name, rgb = text.split("=")
        r, g, b = (int(v) for v in rgb.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=R,G,B, e.g. orange=240,140,30") from None
    if not name.isalpha() or not all(0 <= v <= 255 for v in (r, g, b)):
        raise argparse.ArgumentTypeError(f"{text!r}: a one-word name and values in 0..255")
    return name.lower(), (r, g, b)


def main(argv: list[str] | None = None) -> int:
    from ldm.cli_common import CliParser, int_at_least, user_errors

    parser = CliParser(prog="python -m ldm.data.export_folder", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--count", type=int_at_least(1), default=36)
    parser.add_argument("--resolution", type=int_at_least(8), default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("--mixed", action="store_true", help="assorted sizes, modes and formats")
    parser.add_argument("--corrupt", type=int_at_least(0), default=0, help="unreadable files to add")
    parser.add_argument("--color", type=parse_color, default=None, help="NAME=R,G,B: paint every shape so")
    args = parser.parse_args(argv)
    with user_errors(parser):
        if args.root.exists() and not args.root.is_dir():
            raise UserError(f"{args.root} is a file; give a folder to write the images into")
    export_folder(
        args.root, args.count, args.resolution, args.seed, args.split, args.mixed, args.corrupt, args.color
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
