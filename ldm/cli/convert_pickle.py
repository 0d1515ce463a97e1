"""Convert a pickle weights file to safetensors (read with ``weights_only=True``).

python -m ldm.cli.convert_pickle FILE.pth [TARGET.safetensors]
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file

from ldm.cli.common import CliParser, setup_logging, user_errors
from ldm.core.errors import MissingFileError, UserError
from ldm.core.safe_load import load_state_dict

logger = logging.getLogger("ldm")


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(
        prog="python -m ldm.cli.convert_pickle",
        description="Convert a pickle weights file to safetensors (read with weights_only=True).",
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path, nargs="?", help="default: the source with .safetensors")
    args = parser.parse_args(argv)
    setup_logging()
    with user_errors(parser):
        if not args.source.is_file():
            raise MissingFileError(f"no weights file at {args.source}")
        if args.source.suffix == ".safetensors":
            raise UserError(f"{args.source} is already a .safetensors file; there is nothing to convert")
        target = args.target or args.source.with_suffix(".safetensors")
        state = load_state_dict(args.source, allow_pickle=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    logger.info("wrote %d tensors to %s", len(state), target)


if __name__ == "__main__":
    main()
