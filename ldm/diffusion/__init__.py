"""Stage 2: a text-conditioned UNet trained on autoencoder latents."""
