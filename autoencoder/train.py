"""Stage 1: the KL autoencoder with its full objective, on the shared loop (``ldm.training.loop``).

    loss_ae = rec + w_p * LPIPS + w_kl * KL + [step >= disc_start] * lambda * w_g * (-D(x_rec))
    loss_d  = [step >= disc_start] * hinge(D(x), D(x_rec))

lambda is the adaptive weight (Esser et al. 2021, eq. 7) at the decoder's last layer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from autoencoder.config import VAERunConfig
from autoencoder.evaluate import save_reconstructions
from autoencoder.finish import export_and_evaluate
from autoencoder.model import AutoencoderTrainingForward, decoder_last_layer, trainable_parameters
from autoencoder.objective import autoencoder_objective, discriminator_objective
from autoencoder.setup import autoencoder_to_train, compiled_until_gan, discriminator, perceptual_loss
from autoencoder.validation import ImageValidation
from ldm.core.errors import ConfigError
from ldm.data import build_dataset
from ldm.models.autoencoder import downsampling_factor
from ldm.training.ema import ema_for
from ldm.training.engine import takes_one_model
from ldm.training.loop import Stage, train_loop
from ldm.training.optim import adamw
from ldm.training.run import finish_run, global_batch_line, process_mean, resume_training, start_run

logger = logging.getLogger("ldm")


def train_autoencoder(cfg: VAERunConfig, resume: str | None = None) -> Path:
    """Train, export ``model/``, evaluate into ``eval.json``; returns the output folder."""
    tc, loss_cfg = cfg.train, cfg.loss
    accelerator, out = start_run(cfg, tc)
    if takes_one_model(accelerator):
        raise ConfigError(
            f"stage 1 does not run under {accelerator.distributed_type.value}: it trains two models (the "
            "autoencoder and the discriminator, each with its optimizer), and accelerate's FSDP2 and "
            "DeepSpeed take one; autoencoders fit data parallel (configs/accelerate/multi-gpu.yaml)"
        )
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    vae = autoencoder_to_train(cfg, memory_format)
    params, factor = trainable_parameters(vae, tc.decoder_only), downsampling_factor(vae)
    train_set = build_dataset(cfg.data, "train", cfg.seed, bucket_step=8 * factor)  # data.buckets' sides
    val_set = build_dataset(cfg.data, "val", cfg.seed)
    fixed = torch.stack([val_set[i]["pixel_values"] for i in range(min(8, len(val_set)))])
    validation = None
    if tc.val_every and len(val_set):
        validation = ImageValidation(
            val_set,
            vae.config.latent_channels,
            factor,
            tc.val_items,
            tc.val_batch_size or tc.batch_size,
            cfg.seed,
        )

    # --- discriminator, perceptual loss, optimizers, EMA -------------------------------------
    disc = discriminator(cfg, accelerator, vae.config.in_channels, memory_format)
    lpips = perceptual_loss(cfg, accelerator.device)
    opt_ae = adamw(params, tc.lr, (tc.adam_beta1, tc.adam_beta2), tc.weight_decay)
    opt_d = adamw(disc.parameters(), loss_cfg.disc_lr or tc.lr, (0.5, 0.9), 0.0)
    model, disc, opt_ae, opt_d = accelerator.prepare(AutoencoderTrainingForward(vae), disc, opt_ae, opt_d)
    disc_for_g = accelerator.unwrap_model(disc)  # the adversarial term: no DDP (D gets no gradient there)
    compiled = compiled_until_gan(model, cfg, accelerator.device)  # E and D for the loss before the GAN
    ema = ema_for(params, tc.ema_decay, accelerator.device)
    last_layer = decoder_last_layer(vae)
    start = resume_training(accelerator, out, resume, ema, train_set, tc, cfg.data, cfg.seed, cfg)
    logger.info(
        "training %.2fM of %.2fM autoencoder parameters (%s, f=%d) for %d steps, %s",
        sum(p.numel() for p in params) / 1e6, sum(p.numel() for p in vae.parameters()) / 1e6,
        "decoder only" if tc.decoder_only else "all", factor, tc.max_steps,
        global_batch_line(tc.batch_size, accelerator.num_processes, tc.gradient_accumulation_steps),
    )  # fmt: skip
    average = process_mean(accelerator)  # a gradient over the processes: the global batch's

    # --- the step: one micro-batch -----------------------------------------------------------
    def step(batch: dict, step: int, rng, update) -> dict[str, torch.Tensor]:
        gan_on = step >= loss_cfg.disc_start
        x = batch["pixel_values"].to(accelerator.device, non_blocking=True)
        x = x.contiguous(memory_format=memory_format)  # (B, 3, H, W)
        noise = rng.randn(x.shape[0], vae.config.latent_channels, x.shape[2] // factor, x.shape[3] // factor)
        disc.requires_grad_(False)  # 1. the autoencoder (generator): no gradient leaks into D
        scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
        forward = model if gan_on else compiled
        loss, x_rec, terms = autoencoder_objective(
            forward, disc_for_g, x, loss_cfg, last_layer, gan_on, lpips, scale, noise, average
        )
        if (grad_norm := update(loss, opt_ae, params)) is not None:
            terms["grad_norm"] = grad_norm
        if gan_on:  # 2. the discriminator
            disc.requires_grad_(True)
            d_loss, d_terms = discriminator_objective(disc, x, x_rec, loss_cfg)
            update(d_loss, opt_d)
            terms.update(d_terms)
        return terms

    validate = None
    if validation is not None:
        plain = accelerator.unwrap_model(model)
        validate = lambda: validation(accelerator, plain, loss_cfg, last_layer, lpips, ema, params)  # noqa: E731

    def reconstructions(path: Path) -> None:  # the loop calls it on every process
        if accelerator.is_main_process:
            save_reconstructions(vae, fixed, path)

    stage = Stage(
        "train_vae", step, (model, disc), [(opt_ae, None), (opt_d, loss_cfg.disc_lr or tc.lr)], params,
        sample=reconstructions, validate=validate, progress_key="rec_loss",
        log_compile=tc.compile and start.step < loss_cfg.disc_start,
    )  # fmt: skip
    reached = train_loop(
        accelerator, out, tc, stage, start.batches, start.rng, start.step, start.metrics, ema
    )
    if reached < tc.max_steps:
        return out  # stopped early: resume with --resume latest
    results = None
    if accelerator.is_main_process:
        results = export_and_evaluate(vae, cfg, out, train_set, val_set, fixed, lpips, accelerator.device)
    return finish_run(accelerator, out, results)
