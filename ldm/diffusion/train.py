"""Stage-2 training loop: a text-conditioned UNet on autoencoder latents, top to bottom.

images -> frozen E (or the latent cache) -> z_0 = scaling_factor * z; captions -> condition
dropout -> text encoder -> context; loss = denoising_loss(UNet, z_0, context); AdamW; EMA.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from accelerate.utils import gather, gather_object
from tqdm.auto import tqdm

from conditioning import drop_captions
from conditioning.vocabulary import load_trained_tokens, save_trained_tokens
from ldm.data import build_dataset
from ldm.data.repeat import RepeatedDataset
from ldm.diffusion.cache import CaptionCache, cached_latents, fingerprint, nbytes, sample_latents
from ldm.diffusion.config import LDMRunConfig
from ldm.diffusion.evaluate import evaluate_run, grid_prompts
from ldm.diffusion.export import export_pipeline
from ldm.diffusion.lora import add_lora, save_lora
from ldm.diffusion.models import build_models, pretrained_noise
from ldm.diffusion.noise import training_scheduler
from ldm.diffusion.objective import denoising_loss
from ldm.diffusion.preflight import check_base_model, sample_items
from ldm.diffusion.unet import set_attention_backend
from ldm.images import save_grid
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training.checkpoint import save_checkpoint
from ldm.training.compile import compiled_for_training
from ldm.training.ema import EMA
from ldm.training.memory import MIB, peak_resident_bytes, resident_bytes
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


def train_ldm(cfg: LDMRunConfig, resume: str | None = None) -> Path:
    """Train, export ``model/`` as a diffusers pipeline, evaluate into ``eval.json``; returns the output folder."""
    if cfg.pretrained:  # train on the noise schedule the pretrained UNet learned
        cfg = dataclasses.replace(cfg, noise=pretrained_noise(cfg.pretrained, cfg.noise))
    tc = cfg.train
    accelerator, out = start_run(cfg, tc)
    main = accelerator.is_main_process
    device = accelerator.device

    # --- frozen autoencoder, text encoder, UNet ----------------------------------------------
    vae, vae_dir, text_encoder, unet = build_models(cfg)
    vae.to(device).eval().requires_grad_(False)
    scaling_factor = vae.config.scaling_factor
    text_encoder = text_encoder.to(device)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    unet = unet.to(device, memory_format=memory_format)
    set_attention_backend(unet, cfg.unet.attention, device)
    alphas_cumprod = training_scheduler(cfg.noise).alphas_cumprod.to(device)
    # the words a scratch text encoder knows: its pretrained record, or none yet for a fresh one
    prior_tokens = load_trained_tokens(Path(cfg.pretrained) / "text_encoder") if cfg.pretrained else None
    record_tokens = prior_tokens is not None or (not cfg.pretrained and cfg.text.kind == "scratch")

    # --- data: cached posteriors, or images encoded on the fly --------------------------------
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    train_images = build_dataset(cfg.data, "train", cfg.seed, bucket_step=8 * factor)
    val_images = build_dataset(cfg.data, "val", cfg.seed)
    if main and cfg.preflight.samples > 0:  # can the base model carry this data at all? (seconds)
        text_trains = text_encoder.trainable or bool(cfg.lora.rank and cfg.lora.text_encoder)
        check_base_model(
            sample_items(train_images, cfg.preflight.samples), vae, vae_dir, text_encoder, prior_tokens,
            tc.lr if text_trains else None, cfg.preflight.min_psnr, cfg.preflight.max_unseen_tokens,
            cfg.data.path,
        )  # fmt: skip
    if cfg.cache_latents:
        t0, rss_before = time.perf_counter(), resident_bytes()
        repeats = train_images.times if isinstance(train_images, RepeatedDataset) else 1
        distinct = train_images.base if repeats > 1 else train_images  # each image is encoded once
        if hasattr(distinct, "keep_rendered"):  # shapes: one pass in order, no rendered copy to keep
            distinct.keep_rendered = False
        key = fingerprint(vae_dir, dataclasses.asdict(cfg.data), cfg.seed)
        # each process encodes a shard; all gather them; the main process writes the file
        train_set = cached_latents(
            vae, distinct, 256, cfg.cache_dir, key, write=main, rank=accelerator.process_index,
            world_size=accelerator.num_processes, gather_object=gather_object, gather_tensor=gather, device=device,
        )  # fmt: skip
        peak = peak_resident_bytes()
        logger.info(
            "latent cache: %d items, %.1f MiB, in %.1f s; resident memory %.0f MiB before, peak %s",
            len(train_set), nbytes(train_set) / MIB, time.perf_counter() - t0, rss_before / MIB,
            f"{peak / MIB:.0f} MiB" if peak else "not reported by this OS",
        )  # fmt: skip
        if repeats > 1:
            train_set = RepeatedDataset(train_set, repeats)
        del train_images, distinct  # the images (and any rendered copy the dataset keeps) are done with
    else:
        train_set = train_images

    # --- optimizer, EMA, accelerate ----------------------------------------------------------
    if cfg.lora.rank:  # adapters only; the base weights stay frozen
        trainable = add_lora(unet, text_encoder.model, cfg.lora)
        text_encoder.trainable = cfg.lora.text_encoder  # its forward then runs with autograd
    else:
        trainable = list(unet.parameters())
        if text_encoder.trainable:
            trainable += list(text_encoder.parameters())
    train_text = text_encoder.trainable
    optimizer = adamw(trainable, tc.lr, (tc.adam_beta1, tc.adam_beta2), tc.weight_decay)
    if train_text:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    seen_tokens: set[int] = set()  # ids of the captions the text encoder trains on

    def tokenize(captions: list[str]) -> torch.Tensor:
        ids = accelerator.unwrap_model(text_encoder).tokenize(captions)  # (B, L)
        if record_tokens and train_text:
            seen_tokens.update(ids.unique().tolist())
        return ids

    token_cache = CaptionCache(tokenize)  # (L,) ids per caption
    text_cache = None if train_text else CaptionCache(accelerator.unwrap_model(text_encoder).encode)
    loss_unet = compiled_for_training(unet, tc.compile, device)  # the loss's UNet; sampling uses `unet`
    ema = None
    if tc.ema_decay > 0:
        ema = EMA(trainable, decay=tc.ema_decay)
        ema.to(device)

    guard = NonFiniteGuard(tc.max_nonfinite_steps, device)
    step, data_state, rng_state = resume_run(accelerator, out, resume, ema)
    batches = train_batches(accelerator, train_set, tc, cfg.data, cfg.seed, data_state)
    metrics = metrics_writer(accelerator, out, step)
    prompts = grid_prompts(cfg, val_images)
    n_train = sum(p.numel() for p in trainable) / 1e6
    logger.info(
        "training %.3fM parameters (%s; text encoder %s) for %d steps, %s",
        n_train,
        f"LoRA rank {cfg.lora.rank}" if cfg.lora.rank else "full UNet",
        "trained" if train_text else "frozen",
        tc.max_steps,
        global_batch_line(tc.batch_size, accelerator.num_processes, tc.gradient_accumulation_steps),
    )

    def make_pipeline() -> LatentDiffusionPipeline:
        te = accelerator.unwrap_model(text_encoder)
        return LatentDiffusionPipeline(
            vae, te.model, te.tokenizer, accelerator.unwrap_model(unet), training_scheduler(cfg.noise).config
        )

    # --- loop --------------------------------------------------------------------------------
    stop = min(tc.max_steps, tc.stop_at) if tc.stop_at else tc.max_steps
    rng = StepRandom(cfg.seed, accelerator.process_index, accelerator.num_processes, device)
    if rng_state is not None:  # resumed: continue the stream where the checkpoint left it
        rng.load_state_dict(rng_state)
    with GracefulStop() as stopper:  # SIGTERM / SIGINT end the loop at a step, with a checkpoint
        progress = tqdm(
            total=tc.max_steps, initial=step, disable=not main, desc="train_ldm", dynamic_ncols=True
        )
        loss_sum, count, t_log = torch.zeros((), device=device), 0, time.perf_counter()
        first_step = step
        unet.train()
        text_encoder.train(train_text)
        while step < stop:
            lr = tc.lr * lr_multiplier(
                step, tc.lr_warmup_steps, tc.max_steps, tc.lr_schedule, tc.min_lr_ratio
            )
            set_lr(optimizer, lr)
            for _ in range(tc.gradient_accumulation_steps):
                batch = next(batches)
                with accelerator.accumulate(unet, text_encoder):
                    z = sample_latents(batch, vae, device, rng)  # (B, C, h, w)
                    z0 = (z * scaling_factor).contiguous(memory_format=memory_format)
                    uniform = rng.rand_host(len(batch["caption"]))  # on the CPU: no device-to-host copy
                    captions = drop_captions(list(batch["caption"]), cfg.text.p_uncond, uniform=uniform)
                    if text_cache is not None:
                        context = text_cache(captions)  # (B, L, D), frozen encoder
                    else:
                        ids = token_cache(captions).to(device)  # (B, L)
                        context = text_encoder(ids, deduplicate=True)  # (B, L, D), each distinct caption once
                    loss = denoising_loss(loss_unet, z0, context, alphas_cumprod, cfg.noise, rng)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tc.grad_clip > 0:
                        clip_gradients(accelerator, trainable, tc.grad_clip)
                    # the optimizer step, skipped on the device when the loss is NaN or Inf
                    guard.step(optimizer, loss, accelerator.scaler, accelerator.sync_gradients)
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += torch.nan_to_num(loss.detach(), nan=0.0, posinf=0.0, neginf=0.0)
            if ema is not None:
                ema.step(trainable)
            step += 1
            count += 1
            progress.update(1)
            if tc.compile and step == first_step + 1:
                logger.info("first step, compiling included: %.1f s", time.perf_counter() - t_log)
            if stopper.should_stop(
                accelerator, step % tc.log_every == 0
            ):  # SIGTERM / SIGINT: checkpoint here
                stop = step

            if step % tc.log_every == 0 or step == stop:
                values = {
                    "train/loss": averaged(accelerator, {"loss": loss_sum})["loss"]
                    / (count * tc.gradient_accumulation_steps),
                    "train/lr": lr,
                    "train/step_time": (time.perf_counter() - t_log) / count,
                    "train/skipped_steps": guard.check(),  # raises after too many NaN/Inf losses in a row
                }
                metrics.write(step, values)
                progress.set_postfix(loss=f"{values['train/loss']:.4f}")
                loss_sum.zero_()
                count, t_log = 0, time.perf_counter()
            if main and tc.sample_every and step % tc.sample_every == 0:
                _save_prompt_grid(
                    make_pipeline(), prompts, cfg, out / "samples" / f"step-{step:06d}.png", ema, trainable
                )
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
    if text_cache is not None:
        logger.info("text cache: %d distinct captions encoded once", len(text_cache))

    if step < tc.max_steps:
        logger.info(
            "stopped at step %d of %d (%s); resume with --resume latest",
            step,
            tc.max_steps,
            stopper.signal_name or "train.stop_at",
        )
        return out

    # --- export and evaluation (EMA weights) -------------------------------------------------
    if ema is not None:
        ema.copy_to(trainable)
    results = None
    if main:
        pipe = make_pipeline()
        for module in (pipe.unet, pipe.text_encoder):
            module.eval()
        if cfg.lora.rank:
            save_lora(out / "lora", pipe.unet, pipe.text_encoder if cfg.lora.text_encoder else None)
            logger.info("exported LoRA weights to %s", out / "lora")
            if cfg.lora.merge:
                pipe.fuse_lora()
                export_pipeline(pipe, out / "model")
        else:
            export_pipeline(pipe, out / "model")
        if record_tokens and (out / "model").exists():
            trained = _caption_tokens(tokenize, train_set, seen_tokens) if train_text else set()
            save_trained_tokens(out / "model" / "text_encoder", (prior_tokens or set()) | trained)
        _save_prompt_grid(pipe, prompts, cfg, out / "samples" / "final.png")
        results = evaluate_run(pipe, val_images, cfg, out)
    return finish_run(accelerator, out, results)


def _caption_tokens(tokenize, train_set, seen: set[int]) -> set[int]:
    """Token ids of the training captions: every caption of a finite dataset (so that a resumed run
    records those before the resume too), plus the ids ``seen`` in this run's batches."""
    base = train_set.base if isinstance(train_set, RepeatedDataset) else train_set
    distinct = list(dict.fromkeys(getattr(base, "captions", None) or []))
    ids = set(seen)
    for start in range(0, len(distinct), 1024):
        ids.update(tokenize(distinct[start : start + 1024]).unique().tolist())
    return ids


@torch.no_grad()
def _save_prompt_grid(pipe, prompts, cfg: LDMRunConfig, path: Path, ema=None, params=None) -> None:
    """A grid of fixed prompts (rows) x fixed seeds (columns), with EMA weights when EMA is on."""
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    modules = (pipe.unet, pipe.text_encoder)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        out = pipe(
            prompts,
            num_images_per_prompt=cfg.sample.grid_seeds,
            num_inference_steps=cfg.sample.steps,
            guidance_scale=cfg.sample.guidance_scale,
            sampler=cfg.sample.sampler,
            seed=cfg.seed,
            output_type="pt_signed",
            progress=False,
        )
        save_grid(out.images, path, nrow=cfg.sample.grid_seeds)
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
        if ema is not None:
            ema.restore(params)
