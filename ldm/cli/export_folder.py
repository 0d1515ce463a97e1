"""Write shapes items as an image folder with ``metadata.jsonl``, the layout ``data.dataset=folder`` reads.

    python -m ldm.cli.export_folder DIR [--count 36] [--resolution 32] [--mixed] [--corrupt 1]
        [--color orange=240,140,30] [--shape cross [--word "<cross>"]]

See ``ldm.data.export_folder`` for what ``--mixed``, ``--corrupt``, ``--color`` and ``--shape`` write.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli.common import CliParser, int_at_least, user_errors
from ldm.core.errors import UserError
from ldm.data.export_folder import export_folder
from ldm.data.shapes import NEW_SHAPES


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
    parser = CliParser(prog="python -m ldm.cli.export_folder", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--count", type=int_at_least(1), default=36)
    parser.add_argument("--resolution", type=int_at_least(8), default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("--mixed", action="store_true", help="assorted sizes, modes and formats")
    parser.add_argument("--corrupt", type=int_at_least(0), default=0, help="unreadable files to add")
    parser.add_argument("--color", type=parse_color, default=None, help="NAME=R,G,B: paint every shape so")
    parser.add_argument("--shape", choices=sorted(NEW_SHAPES), help="draw every item as this new shape")
    parser.add_argument("--word", default=None, help="the captions' word for --shape (e.g. a new token)")
    args = parser.parse_args(argv)
    with user_errors(parser):
        if args.root.exists() and not args.root.is_dir():
            raise UserError(f"{args.root} is a file; give a folder to write the images into")
    export_folder(
        args.root, args.count, args.resolution, args.seed, args.split, args.mixed, args.corrupt, args.color,
        args.shape, args.word,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
