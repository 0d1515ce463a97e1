"""Stage 1: the KL autoencoder, its losses and discriminator, its training loop, export."""
