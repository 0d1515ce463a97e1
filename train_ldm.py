"""Stage 2: train the text-conditioned latent diffusion UNet. See ``python train_ldm.py --help``."""

import sys

from ldm.cli.train_ldm import main

if __name__ == "__main__":
    sys.exit(main())
