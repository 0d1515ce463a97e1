"""What the command lines share: how they report errors, arguments, config loading, logging, --dry-run.

An error the user can fix is reported as one line, ``prog: error: <message>``, with exit status 2:
a bad argument by ``CliParser`` (argparse, without the usage block), and a ``ldm.core.errors.UserError``
(a bad config value, a missing folder, broken data) by ``user_errors``. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch

from ldm.core.config import CONFIG_DIR, load_config, to_yaml
from ldm.core.errors import UserError

T = TypeVar("T")
USAGE_ERROR = 2  # argparse's exit status for a bad command line; ours for every error the user can fix


class CliParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``prog: error: <message>`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@contextmanager
def user_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Turn a ``UserError`` raised inside into ``prog: error: <message>`` (one line) and exit status 2."""
    try:
        yield
    except UserError as err:
        message = str(err).replace("\n", " ")
        parser.exit(USAGE_ERROR, f"{parser.prog}: error: {message}\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``low``, else argparse's one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: it must be >= {low}")
        return value

    return parse


def parse_and_load(
    parser: argparse.ArgumentParser, schema: type[T], default_preset: str, argv: list[str] | None
) -> tuple[T, argparse.Namespace]:
    """Parse ``[--config FILE] [--resume latest|PATH] [--dry-run] [key=value ...]`` and load the config.

    A bad config raises ``ConfigError`` naming the key (call this inside ``user_errors``).
    """
    parser.add_argument(
        "--config", default=str(CONFIG_DIR / default_preset), help="YAML preset (default: %(default)s)"
    )
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder to resume from")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and model sizes, then exit"
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.max_steps=200")
    args = parser.parse_args(argv)
    return load_config(schema, args.config, args.overrides), args


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr; under ``accelerate launch`` only rank 0 logs below WARNING."""
    if int(os.environ.get("RANK", "0")) != 0:
        level = max(level, logging.WARNING)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def run_training(train_fn: Callable[..., Any], cfg: Any, resume: str | None) -> int:
    """Log to the console and train; a ``--resume`` that names no checkpoint fails before anything is built."""
    from ldm.training.checkpoint import resolve_checkpoint

    setup_logging()
    if resume:
        resolve_checkpoint(Path(cfg.output_dir), resume)
    train_fn(cfg, resume=resume)
    return 0


def dry_run_report(cfg: Any, models: dict[str, torch.nn.Module]) -> str:
    lines = [to_yaml(cfg).rstrip(), "", "# model sizes"]
    for name, model in models.items():
        lines.append(f"# {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters")
    return "\n".join(lines) + "\n"
