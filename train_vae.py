"""Stage 1: train the KL autoencoder. See ``python train_vae.py --help``."""

import sys

from ldm.cli.train_vae import main

if __name__ == "__main__":
    sys.exit(main())
