"""Stage 2's deterministic validation loss (``train.val_every``).

    val/loss = mean_e || UNet(z_t(e), t(e), c(e)) - target(e) ||^2 / D

over E = val_items x val_timesteps fixed entries: entry e is held-out item e mod val_items (its latent
the posterior mean, encoded once; its caption, never dropped), at the timestep t(e) of a stratified
draw over the whole schedule (``stratified_fractions``: one entry per 1/E of it), with its own fixed
noise. The loss is the unweighted mean squared error of the objective's target (no min-SNR weight), so
runs with other weightings compare. ``val/loss_t*`` are the means over each quarter of the schedule
(DDPM: t in [0, 250), ...; flow: t in [0, 0.25), ...), where low-t and high-t behaviour shows apart.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from conditioning import Conditioner
from conditioning.conditioner import MICRO_KEYS
from ldm.diffusion.objective import Objective
from ldm.train.trained import to_dtype
from ldm.training.engine import is_sharded
from ldm.training.validation import (
    VALIDATION_SEED,
    chunks,
    ema_weights,
    entry_noise,
    eval_mode,
    over_processes,
    stratified_fractions,
    synchronize,
)

BANDS = 4  # val/loss_t* over quarters of the schedule


def band_names(objective: Objective) -> list[str]:
    """``val/loss_t000-249``-style names of the quarters (flow: ``val/loss_t0.00-0.25``)."""
    edges = [objective.time_at(torch.tensor([b / BANDS], dtype=torch.float64)).item() for b in range(BANDS)]
    if objective.time_at(torch.tensor([0.5])).dtype.is_floating_point:
        return [f"val/loss_t{b / BANDS:.2f}-{(b + 1) / BANDS:.2f}" for b in range(BANDS)]
    ends = edges[1:] + [objective.num_train_timesteps]
    width = len(str(objective.num_train_timesteps - 1))
    return [f"val/loss_t{lo:0{width}d}-{hi - 1:0{width}d}" for lo, hi in zip(edges, ends, strict=True)]


class LatentValidation:
    """The fixed entries and their loss; ``__call__`` runs on every process (a collective) and gives
    every process the same figures."""

    def __init__(
        self,
        val_set,
        vae,
        objective: Objective,
        items: int,
        per_item: int,
        batch: int,
        seed: int,
        captions=None,
    ):  # captions: caption -> caption, applied to the held-out captions (caption.prefix / suffix)
        self.objective = objective
        self.batch = batch
        self.seed = VALIDATION_SEED + seed
        device = vae.device
        self.items, self.latents = [], []  # per item: caption, micro-conditioning, pixel size; latent
        with torch.no_grad():  # the posterior means, once: (C, h, w) each, float32
            for i in range(min(items, len(val_set))):
                item = val_set[i]
                pixels = item["pixel_values"]
                mean = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist.mean[0]
                self.latents.append(mean.float() * vae.config.scaling_factor)
                kept = {k: torch.as_tensor(item[k]) for k in MICRO_KEYS if k in item}
                caption = captions(item["caption"]) if captions is not None else item["caption"]
                self.items.append({"caption": caption, "size": tuple(pixels.shape[-2:]), **kept})
        n = len(self.items)
        self.entries = n * per_item
        self.u = stratified_fractions(self.entries, self.seed)  # (E,) fractions of the schedule
        self.names = band_names(objective)

    def __len__(self) -> int:
        return self.entries

    def _chunk_losses(self, indices: range, unet, conditioner: Conditioner, autocast) -> Tensor:
        """Per-entry losses of one chunk, (batch,) (zeros past its end)."""
        out = torch.zeros(self.batch, dtype=torch.float64)
        n = len(self.items)
        groups: dict[tuple, list[int]] = {}  # entries by latent shape (buckets: sizes differ)
        for e in indices:
            groups.setdefault(tuple(self.latents[e % n].shape), []).append(e)
        for shape, entries in groups.items():
            items = [self.items[e % n] for e in entries]
            z0 = torch.stack([self.latents[e % n] for e in entries])  # (B, C, h, w)
            device = z0.device
            eps = torch.stack([entry_noise(shape, self.seed, e) for e in entries]).to(device)
            t = self.objective.time_at(self.u[list(entries)]).to(device)  # (B,)
            target = items[0]["size"]  # (h, w) in pixels, SDXL's target size
            batch = {"caption": [item["caption"] for item in items]}
            for key in MICRO_KEYS:
                if key in items[0]:
                    batch[key] = torch.stack([item[key] for item in items])
            keep = torch.ones(len(entries))  # no condition dropout
            cond = conditioner.batch_conditions(conditioner.encode, batch, target, keep)
            z_t = self.objective.noised(z0, eps, t)
            with autocast():
                kwargs = to_dtype(Conditioner.unet_kwargs(cond), unet.dtype)  # (DeepSpeed: half weights)
                pred = unet(z_t.to(unet.dtype), self.objective.model_timestep(t), **kwargs).sample
            goal = self.objective.target(z0, eps, t)
            mse = (pred.float() - goal.float()).square().flatten(1).mean(1)  # (B,)
            for e, value in zip(entries, mse.tolist(), strict=True):
                out[e - indices.start] = value
        return out

    @torch.no_grad()
    def __call__(
        self, accelerator, unet, conditioner: Conditioner, ema=None, params=None
    ) -> dict[str, float]:
        """``val/loss``, ``val/loss_t*`` and ``val/time`` (seconds) for ``unet`` (the EMA weights when
        ``ema`` is given, ``params`` being what it averages)."""
        synchronize(accelerator.device)
        start = time.perf_counter()
        parts = chunks(self.entries, self.batch)
        with ema_weights(ema, params), eval_mode(unet, *conditioner.encoders):
            rows = over_processes(
                accelerator,
                len(parts),
                self.batch,
                lambda c: self._chunk_losses(parts[c], unet, conditioner, accelerator.autocast),
                lockstep=is_sharded(accelerator),
            )
        losses = rows.flatten()[: self.entries].cpu()  # (E,) in entry order (waits for the device)
        band = (self.u * BANDS).floor().long().clamp(max=BANDS - 1)
        values = {"val/loss": losses.mean().item()}
        for b, name in enumerate(self.names):
            if bool((band == b).any()):  # (fewer entries than bands leave some empty)
                values[name] = losses[band == b].mean().item()
        values["val/time"] = time.perf_counter() - start
        return values
