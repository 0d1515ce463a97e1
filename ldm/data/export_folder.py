"""Write shapes items as an image folder with ``metadata.jsonl``, the layout ``data.dataset=folder`` reads.

    python -m ldm.cli.export_folder DIR [--count 36] [--resolution 32] [--mixed] [--corrupt 1]
        [--color orange=240,140,30] [--shape cross [--word "<cross>"]]

``--mixed`` saves the images at assorted sizes, modes and formats (RGB PNG, RGBA PNG, L PNG,
palette GIF, CMYK JPEG, WebP); ``--corrupt N`` adds N unreadable files, to see how a
training run reports them. ``--color NAME=R,G,B`` paints every shape in a new color (the
captions say so), e.g. to teach a trained model a color it has never seen; ``--shape cross`` draws
every item as a shape no dataset item has (``NEW_SHAPES``), its captions naming it ``--word`` (a new
token, e.g. ``"<cross>"``; default the shape's name).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from PIL import Image

from ldm.data.shapes import COLORS, NEW_SHAPES, ShapesDataset, render
from ldm.data.shapes import caption as shapes_caption

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
    shape: str | None = None,
    word: str | None = None,
) -> Path:
    """Write ``count`` shapes items under ``root`` (half in a subfolder) and their captions;
    ``color`` = (name, rgb) repaints every shape in that color; ``shape`` (one of ``NEW_SHAPES``)
    redraws each as that shape, in a box of the item's size and place, captioned with ``word``
    (default: the shape's name) for the shape."""
    if shape is not None and shape not in NEW_SHAPES:
        raise ValueError(f"shape is {shape!r}; new shapes: {', '.join(NEW_SHAPES)}")
    root = Path(root)
    (root / "more").mkdir(parents=True, exist_ok=True)
    dataset = ShapesDataset(count, resolution, seed, split)
    rows = []
    for i in range(count):
        spec, pixels = dataset.image(i)  # (3, R, R) uint8
        caption = spec.caption
        if color is not None or shape is not None:
            spec = dataclasses.replace(
                spec, color=color[0] if color else spec.color, shape=shape or spec.shape
            )
            if shape is not None:  # a square box: kept inside the image (a triangle's box is lower)
                spec = dataclasses.replace(spec, cy=min(max(spec.cy, spec.size / 2), 1 - spec.size / 2))
            pixels = render([spec], resolution, colors={**COLORS, **dict([color] if color else [])})[0]
            caption = shapes_caption(spec.color, word or spec.shape, spec.background)
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        mode, ext, scale = MIXED_FORMATS[i % len(MIXED_FORMATS)] if mixed else ("RGB", "png", 1.0)
        if scale != 1.0:
            side = round(resolution * scale)
            image = image.resize((side, round(side * (1.0 + 0.25 * (i % 3)))), Image.Resampling.LANCZOS)
        image = image.quantize(64) if mode == "P" else image.convert(mode)
        name = f"{'more/' if i % 2 else ''}{i:05d}.{ext}"
        image.save(root / name)
        rows.append({"file_name": name, "text": caption})
    for k in range(corrupt):
        (root / f"corrupt-{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
