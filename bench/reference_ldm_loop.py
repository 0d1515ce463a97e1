"""The reference for stage-2 training speed: the loop of diffusers' ``train_text_to_image`` example.

Same models (``build_models`` from the same config and seed), data, batch, precision and
hyperparameters as ``train_ldm.py``, trained the way ``examples/text_to_image/train_text_to_image.py``
trains (read against diffusers' source):

- data: the example tokenizes in its dataset transform, a batch of captions per tokenizer call
  (``tokenizer(captions, max_length=model_max_length, padding="max_length", truncation=True,
  return_tensors="pt")``; the DataLoader hands the transform whole batches through
  ``datasets.Dataset.__getitems__``) and its ``collate_fn`` stacks the results. Here the transform
  and the collate are one function, so the step gets ready token ids; the only addition is the
  condition dropout that ``train_ldm.py`` trains with (``text.p_uncond``, one ``rand`` per batch);
- the text encoder is frozen (``requires_grad_(False)``, not in the optimizer, eval mode, its forward
  without autograd) unless ``--train-text-encoder``: then it is trained with the UNet (in the
  optimizer, the gradient clipping and the EMA, prepared by accelerate), as ``train_ldm.py``'s default
  scratch encoder is;
- every step encodes the images with the VAE (no latent cache), ``noise_scheduler.add_noise``, the
  MSE loss (min-SNR weighting and offset noise as the example's ``--snr_gamma`` and
  ``--noise_offset`` when ``noise.min_snr_gamma`` / ``noise.offset_noise`` are set), the loss
  gathered for logging with ``accelerator.gather(loss.repeat(batch)).mean().item()``,
  ``clip_grad_norm_``, ``torch.optim.AdamW``, a diffusers LR scheduler, ``EMAModel`` (no foreach,
  the example's default); no channels_last, no compile. TF32 follows ``train.tf32`` (the example's
  ``--allow_tf32``).

What the example does and this loop leaves out, so that it is never slower than the example: the
progress bar's second read-back per step (``loss.detach().item()`` and ``get_last_lr``), and
``accelerator.log`` of the loss every step (no tracker here). ``metrics.jsonl`` gets a line every
``train.log_every`` steps, as ``train_ldm.py`` writes it.

    python bench/reference_ldm_loop.py OUT_DIR [--train-text-encoder] [key=value ...]   # writes OUT_DIR/metrics.jsonl

It is run by ``bench/train_throughput.py``; the config keys are ``train_ldm.py``'s, except
``text.train``, which ``--train-text-encoder`` sets (frozen without it, as in the example).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from torch.utils.data import DataLoader

from conditioning import drop_captions
from ldm.core.config import CONFIG_DIR, load_config
from ldm.data import build_dataset
from ldm.diffusion.ddpm import training_scheduler
from ldm.train.config import LDMRunConfig
from ldm.train.models import build_models

# train.lr_schedule -> diffusers' get_scheduler name (ours warms up linearly in all three)
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder: metrics.jsonl")
    parser.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="train the text encoder with the UNet (train_ldm.py's default scratch encoder); "
        "without it, frozen as in the example",
    )
    parser.add_argument("overrides", nargs="*", help="train_ldm.py config overrides (key=value)")
    args = parser.parse_intermixed_args(argv)
    for o in args.overrides:
        if o.split("=", 1)[0].strip() == "text.train":
            parser.error(f"{o!r}: the text encoder is frozen unless --train-text-encoder is given")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    train_text = args.train_text_encoder
    overrides = [*args.overrides, f"text.train={str(train_text).lower()}"]
    cfg = load_config(LDMRunConfig, CONFIG_DIR / "ldm/shapes.yaml", overrides)
    tc = cfg.train
    if tc.tf32:  # the example's --allow_tf32 (CUDA only)
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.gradient_accumulation_steps
    )
    vae, _, (wrapper, *_), unet = build_models(cfg)
    text_encoder, tokenizer = wrapper.model, wrapper.tokenizer  # a CLIPTextModel and its CLIPTokenizer
    noise_scheduler = training_scheduler(cfg.noise)

    vae.requires_grad_(False)
    if train_text:
        text_encoder.train()
    else:
        text_encoder.requires_grad_(False)
        text_encoder.eval()  # as from_pretrained leaves it in the example
    unet.train()
    trainable = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])

    optimizer = torch.optim.AdamW(
        trainable, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay, eps=1e-8
    )

    dataset = build_dataset(cfg.data, "train", cfg.seed)

    def preprocess_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
        """The example's batched transform (``tokenize_captions``) and its ``collate_fn``, in one."""
        captions = drop_captions([ex["caption"] for ex in examples], cfg.text.p_uncond)
        input_ids = tokenizer(
            captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
            return_tensors="pt",
        ).input_ids  # (B, L), one call for the batch  # fmt: skip
        pixel_values = torch.stack([ex["pixel_values"] for ex in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        return {"pixel_values": pixel_values, "input_ids": input_ids}

    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, collate_fn=preprocess_batch,
                        drop_last=True, num_workers=cfg.data.num_workers)  # fmt: skip
    lr_scheduler = get_scheduler(
        LR_SCHEDULES[tc.lr_schedule], optimizer,
        num_warmup_steps=tc.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=tc.max_steps * accelerator.num_processes,
    )  # fmt: skip

    if train_text:
        unet, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, loader, lr_scheduler
        )
        models_to_accumulate = (unet, text_encoder)
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
        models_to_accumulate = (unet,)
    ema = EMAModel(trainable, decay=tc.ema_decay, foreach=False) if tc.ema_decay > 0 else None
    if ema is not None:
        ema.to(accelerator.device)

    # the frozen models are only used for inference: in the weight dtype under mixed precision
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}
    weight_dtype = half.get(accelerator.mixed_precision, torch.float32)
    cast = {"dtype": weight_dtype} if weight_dtype != torch.float32 else {}  # fp32: no cast, no warning
    vae.to(accelerator.device, **cast)
    if not train_text:
        text_encoder.to(accelerator.device, **cast)

    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"the example trains epsilon or v_prediction, not noise.prediction_type={prediction_type!r}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = open(args.out / "metrics.jsonl", "w")
    step, train_loss, window_loss, t_log = 0, 0.0, 0.0, time.perf_counter()
    while step < tc.max_steps:
        for batch in loader:
            with accelerator.accumulate(*models_to_accumulate):
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                if cfg.noise.offset_noise:
                    noise += cfg.noise.offset_noise * torch.randn(
                        (latents.shape[0], latents.shape[1], 1, 1), device=latents.device
                    )
                bsz = latents.shape[0]
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
                ).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                # frozen: no autograd (the example gets the same from requires_grad_(False))
                with torch.set_grad_enabled(train_text):
                    encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                if prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                if not cfg.noise.min_snr_gamma:
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                else:  # min-SNR-gamma (Hang et al. 2023), as the example's --snr_gamma
                    snr = compute_snr(noise_scheduler, timesteps)
                    weights = torch.stack([snr, cfg.noise.min_snr_gamma * torch.ones_like(timesteps)], dim=1)
                    weights = weights.min(dim=1)[0]
                    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                    loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()
                # the example's logging: the loss gathered over processes and read back, every step
                avg_loss = accelerator.gather(loss.repeat(tc.batch_size)).mean()
                train_loss += avg_loss.item() / tc.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.grad_clip > 0:
                    accelerator.clip_grad_norm_(trainable, tc.grad_clip)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                if ema is not None:
                    ema.step(trainable)
                step += 1
                window_loss += train_loss  # the example hands train_loss to accelerator.log here
                train_loss = 0.0
                if step % tc.log_every == 0:
                    elapsed = (time.perf_counter() - t_log) / tc.log_every
                    line = {"step": step, "train/loss": window_loss / tc.log_every, "train/step_time": elapsed}  # fmt: skip
                    metrics.write(json.dumps(line) + "\n")
                    metrics.flush()
                    window_loss, t_log = 0.0, time.perf_counter()
            if step >= tc.max_steps:
                break
    metrics.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
