"""Command line of the guidance classifier: ``python train_classifier.py [--config FILE] [key=value ...]``."""

from __future__ import annotations

import sys

from ldm.cli.common import CliParser, parse_and_load, setup_logging, user_errors
from ldm.train.classifier import ClassifierRunConfig

DEFAULT_PRESET = "classifier/shapes.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(
        prog="train_classifier.py",
        description="Train a noise-conditional classifier for classifier guidance (Dhariwal & Nichol 2021).",
    )
    with user_errors(parser):
        cfg, args = parse_and_load(parser, ClassifierRunConfig, DEFAULT_PRESET, argv)
        if args.resume:
            parser.error("--resume: the classifier trains in minutes; run it again instead")
        if args.dry_run:
            from ldm.core.config import to_yaml

            sys.stdout.write(to_yaml(cfg))
            return 0
        from ldm.train.classifier import train_classifier

        setup_logging()
        train_classifier(cfg)
    return 0
