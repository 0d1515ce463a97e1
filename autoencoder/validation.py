"""Stage 1's deterministic validation loss (``train.val_every``).

On the first ``val_items`` held-out images, each with its own fixed posterior noise eps (z = mu +
sigma eps, as in training), the autoencoder objective without its adversarial term (the
discriminator changes as it trains):

    val/loss = rec + perceptual_weight * LPIPS (when on) + kl_weight * KL

also logged by term (``val/rec_loss``, ``val/kl_loss``, ``val/perceptual_loss``).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from autoencoder.config import VAELossConfig
from autoencoder.objective import autoencoder_objective
from ldm.training.validation import (
    VALIDATION_SEED,
    chunks,
    ema_weights,
    entry_noise,
    eval_mode,
    over_processes,
    synchronize,
)

TERMS = ("loss", "rec_loss", "kl_loss", "perceptual_loss")


class ImageValidation:
    """The fixed images and their loss; ``__call__`` runs on every process (a collective)."""

    def __init__(self, val_set, latent_channels: int, factor: int, items: int, batch: int, seed: int):
        self.images = [val_set[i]["pixel_values"] for i in range(min(items, len(val_set)))]  # (3, H, W)
        self.seed = VALIDATION_SEED + seed
        self.noise_shapes = [
            (latent_channels, x.shape[1] // factor, x.shape[2] // factor) for x in self.images
        ]
        self.batch = batch

    def _chunk(
        self, indices: range, model, loss: VAELossConfig, last_layer, lpips, device, autocast
    ) -> Tensor:
        """[sum of each term over the chunk's images, their count], (len(TERMS) + 1,)."""
        out = torch.zeros(len(TERMS) + 1, dtype=torch.float64)
        groups: dict[tuple, list[int]] = {}  # images by size (buckets)
        for i in indices:
            groups.setdefault(tuple(self.images[i].shape), []).append(i)
        for members in groups.values():
            x = torch.stack([self.images[i] for i in members]).to(device)  # (B, 3, H, W)
            noise = torch.stack([entry_noise(self.noise_shapes[i], self.seed, i) for i in members]).to(device)
            with autocast():
                _, _, terms = autoencoder_objective(
                    model, None, x, loss, last_layer, False, lpips, noise=noise
                )
            for k, name in enumerate(TERMS):
                if name in terms:
                    out[k] += terms[name].double().item() * len(members)
            out[-1] += len(members)
        return out

    @torch.no_grad()
    def __call__(self, accelerator, model, loss: VAELossConfig, last_layer, lpips, ema=None, params=None):
        """``val/*`` for ``model`` (an ``AutoencoderTrainingForward``; the EMA weights when ``ema`` is given)."""
        synchronize(accelerator.device)
        start = time.perf_counter()
        parts = chunks(len(self.images), self.batch)
        with ema_weights(ema, params), eval_mode(model):
            rows = over_processes(
                accelerator,
                len(parts),
                len(TERMS) + 1,
                lambda c: self._chunk(
                    parts[c], model, loss, last_layer, lpips, accelerator.device, accelerator.autocast
                ),
            )
        sums = rows.sum(0).cpu()  # over the chunks, in chunk order
        values = {f"val/{name}": (sums[k] / sums[-1]).item() for k, name in enumerate(TERMS)}
        if lpips is None:
            values.pop("val/perceptual_loss")
        values["val/time"] = time.perf_counter() - start
        return values
