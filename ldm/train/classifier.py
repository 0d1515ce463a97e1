"""Training the noise-conditional classifier of classifier guidance (``train_classifier.py``).

images -> frozen E (once; the identity for pixel models) -> z_0 = scaling_factor * z ~ q(z | x);
t ~ U{0..T-1}, z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps on the schedule of the model to guide;
loss = sum over heads of the cross-entropy of p_phi(y_h | z_t, t), y_h read from the caption.
Exports ``model/`` (``NoiseConditionalClassifier.from_pretrained`` reads it) and ``classifier.json``:
the accuracy on noised validation latents per band of t.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ldm.core.config import ConfigError, DataConfig, check_bounds, to_yaml
from ldm.core.io import replace_dir, write_json
from ldm.data import build_dataset
from ldm.data.cache import encode_dataset, scale_std
from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES
from ldm.diffusion.config import NoiseConfig
from ldm.diffusion.ddpm import DDPM
from ldm.models.autoencoder import downsampling_factor
from ldm.models.classifier import NO_LABEL, NoiseConditionalClassifier, caption_labels
from ldm.train.config import AutoencoderChoice
from ldm.train.models import load_autoencoder, pretrained_noise

logger = logging.getLogger("ldm")
SHAPES_HEADS = {"color": list(COLORS), "shape": list(SHAPES), "background": list(BACKGROUNDS)}


@dataclass
class ClassifierModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    layers_per_block: int = 1
    norm_num_groups: int = 16


@dataclass
class ClassifierTrainConfig:
    batch_size: int = 128
    max_steps: int = 1500
    lr: float = 1e-3
    weight_decay: float = 0.01
    lr_warmup_steps: int = 100  # then cosine to 0
    log_every: int = 100

    BOUNDS: ClassVar[dict[str, str]] = {"batch_size": ">= 1", "max_steps": ">= 1", "log_every": ">= 1"}

    def __post_init__(self) -> None:
        check_bounds("train", self)


@dataclass
class ClassifierRunConfig:
    output_dir: str = "runs/classifier-shapes"
    seed: int = 0
    # the latents to classify: those of the model to guide. pretrained: that pipeline folder's
    # autoencoder and noise schedule; else vae (default: runs/vae-shapes/model) and noise below
    pretrained: str | None = None
    vae: str | None = None
    allow_pickle: bool = False
    autoencoder: AutoencoderChoice = field(default_factory=AutoencoderChoice)
    data: DataConfig = field(default_factory=lambda: DataConfig(train_size=20_000, val_size=324, flip=False))
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # the guided model's (shapes.yaml's default)
    # {head: [class words]} read from the captions; empty: the shapes dataset's color, shape, background
    heads: dict[str, list[str]] = field(default_factory=dict)
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    train: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    eval_bands: int = 10  # validation accuracy in this many equal bands of t

    def __post_init__(self) -> None:
        if self.noise.objective != "ddpm":
            raise ConfigError(
                f"noise.objective={self.noise.objective}: classifier guidance is defined for DDPM models only"
            )
        if self.eval_bands < 1:
            raise ConfigError(f"eval_bands={self.eval_bands}: give at least 1")
        for name, classes in self.heads.items():
            if len(classes) < 2:
                raise ConfigError(f"heads.{name}: give at least 2 classes (it has {classes})")
            several = [c for c in classes if not re.fullmatch(r"[\w-]+", str(c))]
            if several:
                raise ConfigError(
                    f"heads.{name}: {several[0]!r} is not one word; classes are read from captions word by word"
                )

    @property
    def head_classes(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.heads.items()} if self.heads else SHAPES_HEADS


def labelled_latents(cfg: ClassifierRunConfig, vae, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(means, stds) of q(z | x) scaled by the autoencoder's factor, and each head's labels, for a split;
    captions naming none (or several) of a head's classes are counted and warned about."""
    images = build_dataset(cfg.data, split, cfg.seed)
    latents = encode_dataset(vae, images, 64, desc=f"encoding {split}")
    if not isinstance(latents.mean, torch.Tensor):
        raise ConfigError("data.buckets: the classifier trains on one latent size; set data.buckets=false")
    scale = vae.config.scaling_factor
    labels = caption_labels(list(latents.captions), cfg.head_classes)
    for name, y in labels.items():
        missing = int((y == NO_LABEL).sum())
        if missing == len(y):
            raise ConfigError(
                f"heads.{name}: no {split} caption names one of {cfg.head_classes[name]}: give heads that "
                "the captions name"
            )
        if missing:
            logger.warning("%s: %d of %d captions name no single %s class; no %s loss on them", split, missing,
                           len(y), name, name)  # fmt: skip
    return latents.mean * scale, scale_std(latents.std, scale), labels


def band_accuracy(
    classifier: NoiseConditionalClassifier,
    objective: DDPM,
    z0: torch.Tensor,
    labels: dict,
    bands: int,
    seed: int,
) -> list[dict]:
    """Accuracy of each head, and of all heads at once, on ``z0`` noised to a random t within each of
    ``bands`` equal bands of [0, T)."""
    gen = torch.Generator().manual_seed(seed)
    T = objective.num_train_timesteps
    rows = []
    device = next(classifier.parameters()).device
    for b in range(bands):
        lo, hi = b * T // bands, (b + 1) * T // bands
        t = torch.randint(lo, hi, (len(z0),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        z_t = objective.noised(z0, eps, t)
        correct = {}
        with torch.no_grad():
            for start in range(0, len(z0), 256):
                logits = classifier(z_t[start : start + 256].to(device), t[start : start + 256].to(device))
                for name, y in labels.items():
                    correct.setdefault(name, []).append(
                        logits[name].argmax(-1).cpu() == y[start : start + 256]
                    )
        hits = {k: torch.cat(v) for k, v in correct.items()}
        known = {k: labels[k] != NO_LABEL for k in hits}  # (a caption without a label counts for no head)
        every = torch.stack([hits[k] | ~known[k] for k in hits]).all(0)[
            torch.stack(list(known.values())).all(0)
        ]
        rows.append({"t_lo": lo, "t_hi": hi, **{k: float(v[known[k]].float().mean()) for k, v in hits.items()},
                     "all": float(every.float().mean())})  # fmt: skip
    return rows


def cosine_lr(step: int, tc: ClassifierTrainConfig) -> float:
    """Linear warmup over ``lr_warmup_steps``, then cosine decay to 0 at ``max_steps``."""
    if step < tc.lr_warmup_steps:
        return tc.lr * (step + 1) / tc.lr_warmup_steps
    progress = (step - tc.lr_warmup_steps) / max(1, tc.max_steps - tc.lr_warmup_steps)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_classifier(cfg: ClassifierRunConfig) -> Path:
    """Train, export ``model/`` and write ``classifier.json``; returns the output folder."""
    if cfg.pretrained:  # the guided model's own schedule
        cfg = dataclasses.replace(cfg, noise=pretrained_noise(cfg.pretrained, cfg.noise))
    accelerator = Accelerator()
    set_seed(cfg.seed, device_specific=True)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    vae, vae_dir = load_autoencoder(cfg)
    vae.to(accelerator.device).eval().requires_grad_(False)
    objective = DDPM.from_config(cfg.noise)
    means, stds, labels = labelled_latents(cfg, vae, "train")
    val_z0, _, val_labels = labelled_latents(cfg, vae, "val")
    side = cfg.data.resolution // downsampling_factor(vae)
    n = cfg.noise
    classifier = NoiseConditionalClassifier(
        in_channels=vae.config.latent_channels, sample_size=side, heads=cfg.head_classes,
        block_out_channels=tuple(cfg.model.block_out_channels), layers_per_block=cfg.model.layers_per_block,
        norm_num_groups=cfg.model.norm_num_groups, num_train_timesteps=n.num_train_timesteps,
        beta_schedule=n.beta_schedule, beta_start=n.beta_start, beta_end=n.beta_end,
    )  # fmt: skip
    if n.zero_terminal_snr:
        raise ConfigError(
            "noise.zero_terminal_snr: the classifier's config keeps no rescaled schedule; leave it off"
        )
    tc = cfg.train
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    classifier, optimizer = accelerator.prepare(classifier, optimizer)
    logger.info("classifier: %.3fM parameters, heads %s, on %s latents %s (autoencoder %s)",
                sum(p.numel() for p in classifier.parameters()) / 1e6, {k: len(v) for k, v in cfg.head_classes.items()},
                len(means), tuple(means.shape[1:]), vae_dir)  # fmt: skip
    gen = torch.Generator().manual_seed(
        cfg.seed + accelerator.process_index
    )  # (each process its own batches)
    device, start, running = accelerator.device, time.perf_counter(), []
    classifier.train()
    for step in range(tc.max_steps):
        idx = torch.randint(0, len(means), (tc.batch_size,), generator=gen)
        z0 = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        t = torch.randint(0, n.num_train_timesteps, (tc.batch_size,), generator=gen)
        z_t = objective.noised(z0, torch.randn(z0.shape, generator=gen), t).to(device)
        logits = classifier(z_t, t.to(device))
        loss = sum(
            torch.nn.functional.cross_entropy(logits[k], y[idx].to(device), ignore_index=NO_LABEL)
            for k, y in labels.items()
        )
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, tc)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        running.append(loss.detach())  # (read at the log line: no host sync each step)
        if (step + 1) % tc.log_every == 0:
            logger.info(
                "step %d: loss %.4f (%.1f s)",
                step + 1,
                float(torch.stack(running).mean()),
                time.perf_counter() - start,
            )
            running = []
    classifier = accelerator.unwrap_model(classifier).eval()
    rows = band_accuracy(classifier, objective, val_z0, val_labels, cfg.eval_bands, cfg.seed)
    results = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "val_items": len(val_z0),
        "per_t_band": rows,
    }
    if accelerator.is_main_process:
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        classifier.save_pretrained(tmp)
        replace_dir(tmp, out / "model")  # (atomically: a failed save leaves the old one)
        write_json(out / "classifier.json", results)
        for r in rows:
            logger.info("t in [%d, %d): %s", r["t_lo"], r["t_hi"],
                        ", ".join(f"{k} {100 * v:.1f}%" for k, v in r.items() if k not in ("t_lo", "t_hi")))  # fmt: skip
        logger.info("wrote %s and %s", out / "model", out / "classifier.json")
    accelerator.wait_for_everyone()
    return out
