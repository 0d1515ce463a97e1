"""What the training command lines share: arguments, config loading, logging, --dry-run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ldm.config import CONFIG_DIR, ConfigError, load_config, to_yaml

T = TypeVar("T")


def parse_and_load(
    parser: argparse.ArgumentParser, schema: type[T], default_preset: str, argv: list[str] | None
) -> tuple[T, argparse.Namespace]:
    """Parse ``[--config FILE] [--resume latest|PATH] [--dry-run] [key=value ...]`` and load the config.

    A bad config exits with status 2 and one line naming the key.
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
    try:
        cfg = load_config(schema, args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return cfg, args


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr; under ``accelerate launch`` only rank 0 logs below WARNING."""
    if int(os.environ.get("RANK", "0")) != 0:
        level = max(level, logging.WARNING)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def run_training(
    parser: argparse.ArgumentParser, train_fn: Callable[..., Any], cfg: Any, resume: str | None
) -> int:
    """Log to the console and train; a missing file (autoencoder, checkpoint) exits 1 with its message."""
    setup_logging()
    try:
        train_fn(cfg, resume=resume)
    except FileNotFoundError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    return 0


def dry_run_report(cfg: Any, models: dict[str, torch.nn.Module]) -> str:
    lines = [to_yaml(cfg).rstrip(), "", "# model sizes"]
    for name, model in models.items():
        lines.append(f"# {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters")
    return "\n".join(lines) + "\n"
