"""The noise-conditional classifier of classifier guidance. See ``python train_classifier.py --help``."""

import sys

from ldm.cli.train_classifier import main

if __name__ == "__main__":
    sys.exit(main())
