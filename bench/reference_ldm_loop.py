"""The reference for stage-2 training speed: the loop of diffusers' ``train_text_to_image`` example.

Same models (``build_models`` from the same config and seed), data, batch, precision and
hyperparameters as ``train_ldm.py``, trained as the example does: every step encodes the batch's
images with the VAE and its (tokenized-per-item) captions with the text encoder, uses
``torch.optim.AdamW`` with its defaults, a diffusers LR scheduler, ``EMAModel`` without foreach,
and reads the loss back with ``.item()``. No caches, no channels_last.

    python bench/reference_ldm_loop.py OUT_DIR [key=value ...]   # writes OUT_DIR/metrics.jsonl

It is run by ``bench/train_throughput.py``; the config keys are ``train_ldm.py``'s.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from conditioning import drop_captions
from ldm.config import CONFIG_DIR, load_config
from ldm.data import build_dataset
from ldm.diffusion.config import LDMRunConfig
from ldm.diffusion.models import build_models
from ldm.diffusion.noise import training_scheduler


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out, overrides = Path(argv[0]), argv[1:]
    cfg = load_config(LDMRunConfig, CONFIG_DIR / "ldm/shapes.yaml", overrides)
    tc = cfg.train
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=tc.mixed_precision)
    vae, _, text_encoder, unet = build_models(cfg)
    noise_scheduler = training_scheduler(cfg.noise)
    vae.requires_grad_(False)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if text_encoder.trainable else [])
    optimizer = torch.optim.AdamW(
        params, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay
    )
    dataset = build_dataset(cfg.data, "train", cfg.seed)

    def collate(items):  # the example tokenizes in its dataset transform, per item
        captions = drop_captions([it["caption"] for it in items], cfg.text.p_uncond)
        return {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "input_ids": torch.cat([text_encoder.tokenize([c]) for c in captions]),
        }

    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, collate_fn=collate, drop_last=True,
                        num_workers=cfg.data.num_workers)  # fmt: skip
    lr_scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.max_steps
    )
    unet, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(
        unet, text_encoder, optimizer, loader, lr_scheduler
    )
    vae.to(accelerator.device)
    ema = EMAModel(params, decay=tc.ema_decay) if tc.ema_decay > 0 else None
    if ema is not None:
        ema.to(accelerator.device)
    unet.train()
    text_encoder.train()
    out.mkdir(parents=True, exist_ok=True)
    metrics = open(out / "metrics.jsonl", "w")
    step, train_loss, t_log = 0, 0.0, time.perf_counter()
    while step < tc.max_steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
                )
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"])
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(tc.batch_size)).mean()
                train_loss += avg_loss.item() / tc.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, tc.grad_clip)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                if ema is not None:
                    ema.step(params)
                step += 1
                if step % tc.log_every == 0:
                    elapsed = (time.perf_counter() - t_log) / tc.log_every
                    metrics.write(
                        json.dumps(
                            {
                                "step": step,
                                "train/loss": train_loss / tc.log_every,
                                "train/step_time": elapsed,
                            }
                        )
                        + "\n"
                    )
                    metrics.flush()
                    train_loss, t_log = 0.0, time.perf_counter()
            if step >= tc.max_steps:
                break
    metrics.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
