"""Stage-1 training loop: the KL autoencoder with its full objective, top to bottom.

    loss_ae = rec + w_p * LPIPS + w_kl * KL + [step >= disc_start] * lambda * w_g * (-D(x_rec))
    loss_d  = [step >= disc_start] * hinge(D(x), D(x_rec))

lambda is the adaptive weight (Esser et al. 2021, eq. 7) at the decoder's last layer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm

from autoencoder.config import VAERunConfig
from autoencoder.discriminator import NLayerDiscriminator
from autoencoder.evaluate import evaluate_autoencoder, save_reconstructions
from autoencoder.export import export_autoencoder, measure_scaling_factor
from autoencoder.model import (
    AutoencoderTrainingForward,
    build_autoencoder,
    decoder_last_layer,
    load_pretrained_autoencoder,
    trainable_parameters,
)
from autoencoder.objective import autoencoder_objective, discriminator_objective
from autoencoder.perceptual import load_lpips
from autoencoder.report import autoencoder_report
from ldm.data import build_dataset
from ldm.errors import ConfigError, MissingFileError
from ldm.training.checkpoint import save_checkpoint
from ldm.training.compile import compiled_for_training
from ldm.training.ema import EMA
from ldm.training.nonfinite import NonFiniteGuard
from ldm.training.optim import adamw, clip_gradients
from ldm.training.randomness import StepRandom
from ldm.training.run import (
    averaged,
    finish_run,
    global_batch_line,
    metrics_writer,
    resume_run,
    set_lr,
    start_run,
    train_batches,
)
from ldm.training.schedule import lr_multiplier
from ldm.training.signals import GracefulStop

logger = logging.getLogger("ldm")


def train_autoencoder(cfg: VAERunConfig, resume: str | None = None) -> Path:
    """Train, export ``model/``, evaluate into ``eval.json``; returns the output folder."""
    tc = cfg.train
    accelerator, out = start_run(cfg, tc)
    main = accelerator.is_main_process

    # --- models and optimizers ---------------------------------------------------------------
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    if cfg.pretrained:
        vae = load_pretrained_autoencoder(cfg.pretrained, cfg.allow_pickle).to(memory_format=memory_format)
    else:
        vae = build_autoencoder(cfg.model, cfg.data.resolution).to(memory_format=memory_format)
    params = trainable_parameters(vae, tc.decoder_only)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.data.resolution % factor:  # a pretrained model's factor is known only now
        raise ConfigError(
            f"config key 'data.resolution' is {cfg.data.resolution}; it must be a multiple of the "
            f"downsampling factor {factor} of the autoencoder at pretrained={cfg.pretrained}"
        )

    # --- data --------------------------------------------------------------------------------
    bucket_step = 8 * factor  # sides for data.buckets
    train_set = build_dataset(cfg.data, "train", cfg.seed, bucket_step=bucket_step)
    val_set = build_dataset(cfg.data, "val", cfg.seed)

    # --- discriminator, perceptual loss, optimizers ------------------------------------------
    disc = NLayerDiscriminator(
        vae.config.in_channels, cfg.loss.disc_channels, cfg.loss.disc_layers, cfg.loss.disc_norm
    )
    if accelerator.num_processes > 1 and cfg.loss.disc_norm == "batch":
        if accelerator.device.type in ("cuda", "xpu"):  # batch statistics of the global batch
            disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
        else:
            logger.warning(
                "loss.disc_norm=batch on %d CPU processes: PyTorch has no SyncBatchNorm on the CPU, so the "
                "discriminator normalises with each process's own batch; set loss.disc_norm=group for "
                "results that do not depend on the process count",
                accelerator.num_processes,
            )
    disc = disc.to(memory_format=memory_format)
    lpips = None
    if cfg.loss.lpips_weights and not Path(cfg.loss.lpips_weights).is_file():
        raise MissingFileError(
            f"loss.lpips_weights={cfg.loss.lpips_weights}: no such file (a VGG16 state dict)"
        )
    if cfg.loss.perceptual_weight > 0:
        lpips, message = load_lpips(cfg.loss.lpips_weights, cfg.allow_pickle)
        logger.info(message)
        if lpips is not None:
            lpips = lpips.to(accelerator.device)
    betas = (tc.adam_beta1, tc.adam_beta2)
    opt_ae = adamw(params, tc.lr, betas, tc.weight_decay)
    opt_d = adamw(disc.parameters(), cfg.loss.disc_lr or tc.lr, (0.5, 0.9), 0.0)
    model, disc, opt_ae, opt_d = accelerator.prepare(AutoencoderTrainingForward(vae), disc, opt_ae, opt_d)
    disc_for_g = accelerator.unwrap_model(disc)  # the adversarial term: no DDP (D gets no gradient there)
    # train.compile: E and D compiled for the loss until the GAN starts. From loss.disc_start the
    # adaptive weight takes the gradient at the decoder's last layer with retain_graph, which in a
    # compiled graph runs its whole backward an extra time (measured 0.55x the eager step): eager then.
    compiled = compiled_for_training(model, tc.compile and cfg.loss.disc_start > 0, accelerator.device)
    if tc.compile and cfg.loss.disc_start < tc.max_steps:
        logger.info("train.compile: steps from loss.disc_start=%d (the GAN) run eagerly", cfg.loss.disc_start)
    ema = None
    if tc.ema_decay > 0:
        ema = EMA(params, decay=tc.ema_decay)
        ema.to(accelerator.device)
    last_layer = decoder_last_layer(vae)

    # --- resume ------------------------------------------------------------------------------
    guard = NonFiniteGuard(tc.max_nonfinite_steps, accelerator.device)
    guard_d = NonFiniteGuard(tc.max_nonfinite_steps, accelerator.device)
    step, data_state, rng_state = resume_run(accelerator, out, resume, ema)
    batches = train_batches(accelerator, train_set, tc, cfg.data, cfg.seed, data_state)
    metrics = metrics_writer(accelerator, out, step)
    fixed = torch.stack([val_set[i]["pixel_values"] for i in range(min(8, len(val_set)))])
    logger.info(
        "training %.2fM of %.2fM autoencoder parameters (%s, f=%d) for %d steps, %s",
        sum(p.numel() for p in params) / 1e6,
        sum(p.numel() for p in vae.parameters()) / 1e6,
        "decoder only" if tc.decoder_only else "all",
        2 ** (len(vae.config.block_out_channels) - 1),
        tc.max_steps,
        global_batch_line(tc.batch_size, accelerator.num_processes, tc.gradient_accumulation_steps),
    )

    # --- loop --------------------------------------------------------------------------------
    stop = min(tc.max_steps, tc.stop_at) if tc.stop_at else tc.max_steps
    rng = StepRandom(cfg.seed, accelerator.process_index, accelerator.num_processes, accelerator.device)
    if rng_state is not None:  # resumed: continue the stream where the checkpoint left it
        rng.load_state_dict(rng_state)
    latent_channels, factor = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)

    def average(grad: torch.Tensor) -> torch.Tensor:  # over processes: the global batch's gradient
        return accelerator.reduce(grad, "mean") if accelerator.num_processes > 1 else grad

    with GracefulStop() as stopper:  # SIGTERM / SIGINT end the loop at a step, with a checkpoint
        progress = tqdm(
            total=tc.max_steps, initial=step, disable=not main, desc="train_vae", dynamic_ncols=True
        )
        sums: dict[str, torch.Tensor] = {}  # summed on the device; read back only when logging
        counts: dict[str, int] = {}
        count, t_log = 0, time.perf_counter()
        first_step = step
        model.train()
        disc.train()
        while step < stop:
            lr = tc.lr * lr_multiplier(
                step, tc.lr_warmup_steps, tc.max_steps, tc.lr_schedule, tc.min_lr_ratio
            )
            set_lr(opt_ae, lr)
            set_lr(opt_d, (cfg.loss.disc_lr or tc.lr) * lr / tc.lr)
            gan_on = step >= cfg.loss.disc_start
            for _ in range(tc.gradient_accumulation_steps):
                batch = next(batches)
                x = batch["pixel_values"].to(accelerator.device, non_blocking=True)
                x = x.contiguous(memory_format=memory_format)  # (B, 3, H, W)
                noise = rng.randn(x.shape[0], latent_channels, x.shape[2] // factor, x.shape[3] // factor)
                with accelerator.accumulate(model, disc):
                    # 1. autoencoder (generator) step; D is frozen so that no gradient leaks into it
                    disc.requires_grad_(False)
                    scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
                    forward = model if gan_on else compiled
                    loss, x_rec, terms = autoencoder_objective(
                        forward, disc_for_g, x, cfg.loss, last_layer, gan_on, lpips, scale, noise, average
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tc.grad_clip > 0:
                        terms["grad_norm"] = clip_gradients(accelerator, params, tc.grad_clip).detach()
                    # the optimizer step, skipped on the device when the loss is NaN or Inf
                    guard.step(opt_ae, loss, accelerator.scaler, accelerator.sync_gradients)
                    opt_ae.zero_grad(set_to_none=True)
                    # 2. discriminator step
                    if gan_on:
                        disc.requires_grad_(True)
                        d_loss, d_terms = discriminator_objective(disc, x, x_rec, cfg.loss)
                        accelerator.backward(d_loss)
                        guard_d.step(opt_d, d_loss, accelerator.scaler, accelerator.sync_gradients)
                        opt_d.zero_grad(set_to_none=True)
                        terms.update(d_terms)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0) + value
                    counts[key] = counts.get(key, 0) + 1
            if ema is not None:
                ema.step(params)
            step += 1
            count += 1
            progress.update(1)
            if tc.compile and step == first_step + 1 and not gan_on:
                logger.info("first step, compiling included: %.1f s", time.perf_counter() - t_log)
            if stopper.should_stop(
                accelerator, step % tc.log_every == 0
            ):  # SIGTERM / SIGINT: checkpoint here
                stop = step

            if step % tc.log_every == 0 or step == stop:
                means = averaged(accelerator, {k: v / counts[k] for k, v in sums.items()})
                values = {f"train/{k}": v for k, v in means.items()}
                values.update({"train/lr": lr, "train/step_time": (time.perf_counter() - t_log) / count})
                # NaN/Inf steps since the last log; too many in a row raise
                values["train/skipped_steps"] = guard.check() + guard_d.check()
                metrics.write(step, values)
                progress.set_postfix(rec=f"{values['train/rec_loss']:.4f}")
                sums, counts, count, t_log = {}, {}, 0, time.perf_counter()
            if main and tc.sample_every and step % tc.sample_every == 0:
                save_reconstructions(vae, fixed, out / "samples" / f"step-{step:06d}.png")
            if step == stop or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                save_checkpoint(
                    accelerator,
                    out,
                    step,
                    {"data": batches.state_dict(), "rng": rng.state_dict()},
                    tc.keep_checkpoints,
                    ema,
                )
    progress.close()

    if step < tc.max_steps:
        logger.info(
            "stopped at step %d of %d (%s); resume with --resume latest",
            step,
            tc.max_steps,
            stopper.signal_name or "train.stop_at",
        )
        return out

    # --- export and evaluation ---------------------------------------------------------------
    if ema is not None:
        ema.copy_to(params)
    results = None
    if main:
        vae.eval()
        # scaling_factor from training images (unaugmented); a stream has no index: its validation items then
        scale_set = val_set if isinstance(train_set, IterableDataset) else train_set
        if (
            tc.decoder_only
        ):  # the encoder did not change: keep the factor the diffusion model was trained with
            factor = vae.config.scaling_factor
        else:
            factor = measure_scaling_factor(vae, scale_set, cfg.eval.scale_samples, tc.batch_size * 4)
        export_autoencoder(vae, out / "model", factor)
        save_reconstructions(vae, fixed, out / "samples" / "final.png")
        if lpips is None:  # LPIPS as a metric even when it is not in the loss, if its weights are present
            lpips = load_lpips(cfg.loss.lpips_weights, cfg.allow_pickle)[0]
            lpips = lpips.to(accelerator.device) if lpips is not None else None
        results = evaluate_autoencoder(
            vae, val_set, cfg.eval, batch_size=tc.batch_size * 4, allow_pickle=cfg.allow_pickle, lpips=lpips
        )
        results["scaling_factor"] = factor
        autoencoder_report(out, results, f"Report: {out.name}")
    return finish_run(accelerator, out, results)
