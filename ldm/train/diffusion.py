"""Stage 2: a text-conditioned UNet on autoencoder latents, on the shared loop (``ldm.training.loop``).

images -> frozen E (or the latent cache) -> z_0 = scaling_factor * z; captions -> condition dropout
-> conditioner -> UNet keyword arguments; loss = objective.loss(UNet, z_0) (DDPM or rectified flow).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from conditioning import Conditioner
from conditioning.dropout import NULL_CAPTION
from ldm.core.errors import ConfigError
from ldm.data import build_dataset
from ldm.data.cache import sample_latents
from ldm.data.captions import MAX_TAGS, transform_captions, trigger_words
from ldm.data.concepts import SOURCE_KEY
from ldm.data.masks import latent_mask
from ldm.diffusion.registry import build_objective
from ldm.models.autoencoder import downsampling_factor, is_identity
from ldm.pipelines.single_file import check_single_file_layout
from ldm.train import setup
from ldm.train.config import LDMRunConfig
from ldm.train.data import cached_conditions, latent_training_set, text_training_set
from ldm.train.evaluate import grid_prompts, save_prompt_grid
from ldm.train.finish import export_and_evaluate
from ldm.train.models import pretrained_folder, pretrained_noise
from ldm.train.preflight import preflight
from ldm.train.sources import SourceTerms, ensure_class_images, log_sources, shown_caption
from ldm.train.validation import LatentValidation
from ldm.train.whole import WholePipeline
from ldm.training.compile import compiled_for_training
from ldm.training.ema import ema_for
from ldm.training.engine import flattens_weights, is_sharded, takes_one_model
from ldm.training.loop import Stage, train_loop
from ldm.training.optim import make_optimizer
from ldm.training.run import finish_run, resume_training, start_run
from ldm.training.validation import ema_weights, eval_mode

logger = logging.getLogger("ldm")


def train_ldm(cfg: LDMRunConfig, resume: str | None = None) -> Path:
    """Train, export ``model/`` as a diffusers pipeline, evaluate into ``eval.json``; returns the output folder."""
    cfg = pretrained_folder(cfg)  # a single-file pretrained: converted to a diffusers folder
    if cfg.pretrained:  # train on the noise schedule (and objective) the pretrained UNet learned
        cfg = dataclasses.replace(cfg, noise=pretrained_noise(cfg.pretrained, cfg.noise))
    tc = cfg.train
    accelerator, out = start_run(cfg, tc)
    device, memory_format = (
        accelerator.device,
        torch.channels_last if tc.channels_last else torch.contiguous_format,
    )
    # FSDP2 and DeepSpeed flatten contiguous weights only: those stay contiguous, activations channels-last
    weights_format = torch.contiguous_format if flattens_weights(accelerator) else memory_format
    vae, vae_dir, conditioner, unet = setup.models_on_device(cfg, device, weights_format)
    objective = build_objective(cfg.noise)
    tokens = setup.TokenRecord.of_run(cfg)  # the words a scratch text encoder knows
    if tokens.prior is not None:  # textual inversion's new tokens are learned by design
        tokens.prior |= setup.new_token_ids(cfg, conditioner)

    # --- data: cached posteriors, or images encoded on the fly --------------------------------
    if cfg.data.sources:  # DreamBooth: the class images a regularization source lacks, by the base model
        with eval_mode(unet, *[e.model for e in conditioner.encoders]):
            ensure_class_images(
                cfg, accelerator, lambda: setup.training_pipeline(vae, conditioner, unet, objective)
            )
    train_set = build_dataset(cfg.data, "train", cfg.seed, bucket_step=8 * downsampling_factor(vae))
    log_sources(cfg, train_set, accelerator.num_processes)
    val_set = build_dataset(cfg.data, "val", cfg.seed)
    if accelerator.is_main_process:  # can the base model carry this data at all? (seconds)
        preflight(cfg, train_set, vae, vae_dir, conditioner, tokens.prior)
    validation = None  # fixed held-out latents, encoded now (before the cache may drop the images)
    if tc.val_every and len(val_set):
        validation = LatentValidation(
            val_set,
            vae,
            objective,
            tc.val_items,
            tc.val_timesteps,
            tc.val_batch_size or tc.batch_size,
            cfg.seed,
            trigger_words(cfg.caption),  # held-out captions with the training captions' prefix / suffix
        )
    if cfg.cache_latents:  # the images (and any rendered copy) are done with once cached
        train_set = latent_training_set(cfg, accelerator, vae, vae_dir, train_set)

    # --- what trains, its optimizer, EMA; where the run starts -------------------------------
    trainable = setup.trainable_parameters(cfg, unet, conditioner)
    setup.cast_frozen(cfg, unet, conditioner, trainable)
    train_text = conditioner.trainable
    # trains on the captions' words: the text encoder, or its LoRA (new tokens' rows alone learn no others)
    tokens.training = train_text and (not cfg.ti.tokens or cfg.lora.text_encoder)
    text_on_disk = text_training_set(cfg, accelerator, conditioner, train_set)  # frozen text + cache_dir
    null_text = conditioner.encode([NULL_CAPTION]) if text_on_disk else None  # what dropout gives
    if cfg.export.single_file and is_identity(
        vae
    ):  # (a pretrained pixel folder: kind=identity is checked sooner)
        raise ConfigError(
            "export.single_file=true writes the original Stable Diffusion layout, which holds a VAE; this "
            f"pixel-space model (pretrained={cfg.pretrained}) has none: set export.single_file=false"
        )
    if cfg.export.single_file and not cfg.lora.rank:  # fail now, not after training (LoRA: fused at the end)
        check_single_file_layout(setup.training_pipeline(vae, conditioner, unet, objective))
    if takes_one_model(accelerator) and tc.optimizer in ("prodigy", "schedulefree"):
        if tc.optimizer == "prodigy" or not is_sharded(accelerator):  # (schedule-free under FSDP is fine)
            raise ConfigError(
                f"train.optimizer={tc.optimizer} under {accelerator.distributed_type.value} is not supported: "
                "DeepSpeed's optimizer holds copies of the weights (schedule-free's averaged weights would not "
                "reach the model), and Prodigy sums its step-size statistics per process; use DDP "
                "(configs/accelerate/multi-gpu.yaml) or train.optimizer=adamw"
            )
    if tc.optimizer == "schedulefree" and tc.ema_decay > 0:
        logger.warning(
            "train.optimizer=schedulefree with train.ema_decay=%g: the EMA of the stepped weights takes the "
            "place of schedule-free's own average in grids, validation and the export; set "
            "train.ema_decay=0 to use that average", tc.ema_decay,
        )  # fmt: skip
    if is_sharded(accelerator) and cfg.lora.rank:
        raise ConfigError(
            "LoRA under FSDP is not supported: a LoRA's trained weights are a few MB, which data "
            "parallel holds whole; launch with configs/accelerate/multi-gpu.yaml (DDP) instead"
        )
    if takes_one_model(accelerator) and cfg.ti.tokens:
        raise ConfigError(
            f"ti.tokens under {accelerator.distributed_type.value} is not supported: the new tokens' rows "
            "are a few KB, which data parallel holds whole; launch with configs/accelerate/multi-gpu.yaml (DDP)"
        )
    groups = setup.parameter_groups(cfg, trainable, conditioner)  # the new tokens' rows: ti.lr
    optimizer = make_optimizer(tc.optimizer, groups, tc.lr, (tc.adam_beta1, tc.adam_beta2), tc.weight_decay)
    trained, optimizer, trainable = setup.prepare(accelerator, unet, conditioner, optimizer)
    modules = accelerator.unwrap_model(trained)  # the UNet (and conditioner) inside, FSDP units when sharded
    conditions = conditioner.training_conditions(conditioner, tokens)  # runs inside `trained`'s forward
    if cfg.caption.draws:  # shuffled / dropped-out tags rarely repeat: nothing kept per caption
        conditioner.cache.max_items = 0
    # the loss's module, compiled (sampling uses the plain UNet). DDP and one process: the whole prepared
    # module, its conditioning computed outside (so DDP's all-reduces overlap a compiled backward);
    # FSDP and DeepSpeed: the UNet inside the one module, whose forward runs a trained conditioner
    outside = not takes_one_model(accelerator)
    loss_model = compiled_for_training(trained, tc.compile, device) if outside else trained
    if not outside:
        modules.use_for_loss(compiled_for_training(modules.unet, tc.compile, device))
    ema = ema_for(trainable, tc.ema_decay, device)
    start = resume_training(accelerator, out, resume, ema, train_set, tc, cfg.data, cfg.seed, cfg)
    per_source = SourceTerms.of(cfg, device) if cfg.data.sources else None  # concept datasets
    prompts = grid_prompts(cfg, val_set, train_set, shown_caption(cfg, per_source))
    setup.log_plan(cfg, trainable, tokens.training, objective.name, accelerator.num_processes)
    factor = downsampling_factor(vae)
    pipeline = WholePipeline(accelerator, vae, conditioner, trained, objective, cfg.unet.attention)

    # --- the step: one micro-batch -----------------------------------------------------------
    def step(batch: dict, _: int, rng, update) -> dict[str, torch.Tensor]:
        z0 = sample_latents(batch, vae, device, rng) * vae.config.scaling_factor  # (B, C, h, w)
        z0 = z0.contiguous(memory_format=memory_format)
        mask = batch.get("mask")  # masked loss: (B, 1, h, w) from the cache, (B, 1, H, W) from the images
        mask = latent_mask(mask.to(device), tuple(z0.shape[-2:])) if mask is not None else None
        uniform = rng.rand_host(len(batch["caption"]))  # on the CPU: no device-to-host copy
        sources = batch[SOURCE_KEY] if per_source is not None else None  # (B,) each item's source
        captions = per_source.captions(sources) if per_source is not None else cfg.caption
        if per_source is not None or cfg.caption.changes_captions:  # tags, prefix and suffix (training only)
            draws = rng.rand_host_rows(len(batch["caption"]), 2 * MAX_TAGS) if cfg.caption.draws else None
            batch = {**batch, "caption": transform_captions(list(batch["caption"]), captions, draws)}
        p_uncond = per_source.p_uncond[sources] if per_source is not None else None
        target = (z0.shape[-2] * factor, z0.shape[-1] * factor)  # (h, w) in pixels, SDXL's target size

        source = cached_conditions(batch, null_text, device) if text_on_disk else conditions

        def unet_kwargs() -> dict:
            cond = conditioner.batch_conditions(source, batch, target, uniform, p_uncond)
            return Conditioner.unet_kwargs(cond)

        if outside:
            kwargs = unet_kwargs()
            losses = objective.losses(lambda z_t, t: loss_model(z_t, t, **kwargs), z0, rng, mask)
        else:  # inside the one module's forward
            losses = objective.losses(lambda z_t, t: loss_model(z_t, t, unet_kwargs), z0, rng, mask)  # (B,)
        if per_source is not None:  # DreamBooth: class images weighted by data.prior_loss_weight
            loss = (losses * per_source.weight[sources.to(device)]).mean()
        else:
            loss = losses.mean()
        norm = update(loss, optimizer, trainable)
        terms = {"loss": torch.nan_to_num(loss.detach(), nan=0.0, posinf=0.0, neginf=0.0)}
        if per_source is not None and per_source.has_prior:  # (a skipped non-finite step logs 0, as loss)
            finite = torch.nan_to_num(losses.detach(), nan=0.0, posinf=0.0, neginf=0.0)
            terms.update(per_source.role_terms(finite, sources.to(device)))
        return terms if norm is None else {**terms, "grad_norm": norm}

    def grid(path: Path) -> None:  # every process (FSDP gathers); the main process draws
        with ema_weights(ema, trainable):
            pipe = pipeline()
            if pipe is not None:
                with accelerator.autocast():  # mixed precision: the grid in the half dtype, as training
                    save_prompt_grid(pipe, prompts, cfg, path)

    validate = None
    if validation is not None:
        validate = lambda: validation(accelerator, modules.unet, conditioner, ema, trainable)  # noqa: E731
    stage = Stage(
        "train_ldm", step, (trained,), [(optimizer, None)], trainable, grid, validate,
        log_compile=tc.compile,
    )  # fmt: skip
    reached = train_loop(
        accelerator, out, tc, stage, start.batches, start.rng, start.step, start.metrics, ema
    )
    if not train_text and not text_on_disk and not cfg.caption.draws:
        logger.info("text cache: %d distinct captions encoded once", len(conditioner.cache))
    if reached < tc.max_steps:
        return out  # stopped early: resume with --resume latest
    results = None
    pipe = pipeline()  # every process: FSDP gathers the weights (the EMA's, copied in by the loop)
    if pipe is not None:
        record = tokens.final(conditioner, train_set)
        with accelerator.autocast():  # (the export writes the float32 weights; sampling in the half dtype)
            results = export_and_evaluate(pipe, cfg, out, val_set, prompts, record)
    return finish_run(accelerator, out, results)
