"""One GPU check: what users train and sample on, each against its reference in the same run.

    python bench/gpu.py [--tiny] [--sections train attention sampling sdxl_lora tiled_decode]
        [--out bench/results/gpu.json]

Models are built from config with random weights (no downloads): the UNet of
``configs/ldm/txt2img-256.yaml``, a CLIP ViT-L/14-sized text encoder (transformers' ``CLIPTextModel``,
12 layers of 768), the autoencoder of ``configs/vae/kl-f8-256.yaml``'s size (Stable Diffusion's), and
for SDXL the UNet of ``configs/ldm/sdxl-scratch.yaml`` with ``configs/ldm/sdxl-lora.yaml``'s adapters.
Sections (each a key of the JSON):

- ``train``: one stage-2 step at 256 and 512 px, at the largest batch of ``BATCHES`` that the reference
  fits. Ours: cached latents and text embeddings, bf16 autocast, SDPA, fused AdamW, our EMA, eager
  and compiled. The reference does per step what diffusers' ``train_text_to_image.py`` does: VAE
  encode, batched tokenization and text encode (bf16, no grad), ``torch.optim.AdamW`` (foreach),
  diffusers' ``EMAModel``, min-SNR weighting by ``compute_snr``; bf16 autocast. Images/s, the ratio,
  peak memory, and MFU: the FLOPs of our step (``FlopCounterMode``) / its time / the GPU's bf16 dense
  peak (``PEAK_BF16`` by name, else measured with matmuls).
- ``attention``: SDPA, xformers (when importable on CUDA) and math: the training step and one
  sampling call of the UNet (batch 2: guidance's two halves).
- ``sampling``: 30 DPM++ 2M steps at guidance 7.5, batch 1 and 4, fp16: ``LatentDiffusionPipeline``
  against diffusers' ``StableDiffusionPipeline`` loading the same folder, each eager and with its UNet
  compiled; the images' largest difference.
- ``sdxl_lora``: the SDXL preset's settings (rank 16 on the attention projections, gradient
  checkpointing, bf16, its optimizer) at 1024 px, batch 1: step time and peak memory.
- ``tiled_decode``: one latent of 2048 px decoded whole and in tiles: time and peak memory (or the
  untiled decode's out-of-memory).

``--tiny`` runs the same code on the CPU with tiny models in under a minute (``tests/test_gpu_bench.py``
runs it, so that the script cannot rot while no GPU is at hand); there, torch.compile uses the
``eager`` backend (dynamo's tracing without code generation) and sampling runs in float32.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel, compute_snr
from mfu import matmul_peak, sync  # bench/, on the path of a script run from it
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from conditioning.tokenizer import build_clip_tokenizer
from ldm.core.config import CONFIG_DIR, load_config
from ldm.diffusion.ddpm import training_scheduler
from ldm.diffusion.registry import build_objective
from ldm.models.lora import add_lora
from ldm.models.unet import build_unet, set_attention_backend, xformers_available
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.samplers import make_scheduler
from ldm.pipelines.tiled_decode import decode_tiled
from ldm.train.config import LDMRunConfig
from ldm.training.ema import ema_for
from ldm.training.optim import adamw, make_optimizer

SECTIONS = ("train", "attention", "sampling", "sdxl_lora", "tiled_decode")
# bf16 dense tensor-core peaks (FLOP/s) from the vendors' data sheets, by a substring of the device name
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.5e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12}
SIZES = {
    "gpu": {"resolutions": [256, 512], "batches": [64, 48, 32, 24, 16, 8, 4], "steps": 10, "warmup": 3,
            "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "projection_dim": 768},
            "vae": [128, 256, 512, 512], "sample_px": 512, "sample_steps": 30, "sample_batches": [1, 4],
            "repeats": 3, "sdxl_px": 1024, "decode_px": 2048, "tile": 64, "backend": "inductor"},
    "tiny": {"resolutions": [32, 64], "batches": [4, 2], "steps": 2, "warmup": 1,
             "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "projection_dim": 32},
             "vae": [8, 8, 8, 8], "sample_px": 64, "sample_steps": 2, "sample_batches": [1, 2],
             "repeats": 1, "sdxl_px": 64, "decode_px": 128, "tile": 8, "backend": "eager"},
}  # fmt: skip
TINY_UNET = ["unet.block_out_channels=[16, 32]", "unet.cross_attention=[true, true]", "unet.layers_per_block=1",
             "unet.norm_num_groups=8", "unet.attention_head_dim=4"]  # fmt: skip
TINY_SDXL = ["unet.block_out_channels=[16, 32]", "unet.cross_attention=[false, true]", "unet.layers_per_block=1",
             "unet.norm_num_groups=8", "unet.heads_per_level=[2, 4]", "unet.transformer_layers_per_block=[1, 2]",
             "unet.addition_time_embed_dim=8"]  # fmt: skip
DATA = ["data.dataset=shapes", "data.buckets=false"]  # the presets name no data; none is read here
CAPTION = "a photograph of an astronaut riding a horse on the moon, highly detailed, golden hour light"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fresh(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def bf16_peak(device: torch.device) -> tuple[float, str]:
    """(bf16 dense FLOP/s, where the figure comes from): the data-sheet table by name, else matmuls."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16.items():
            if key in name:
                return flops, f"data sheet ({key})"
    return matmul_peak(
        device, torch.bfloat16, 2.0 if device.type == "cuda" else 0.5
    ), "measured (bf16 matmuls)"


def time_it(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds of ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Models:
    """The SD-sized (or tiny) components, on the CPU, built once from config with fixed seeds."""

    def __init__(self, size: dict, tiny: bool) -> None:
        self.cfg = load_config(
            LDMRunConfig, CONFIG_DIR / "ldm/txt2img-256.yaml", DATA + (TINY_UNET if tiny else [])
        )
        self.cfg.unet.gradient_checkpointing = False  # the same on both sides; ours trains either way
        self.tokenizer = build_clip_tokenizer(77)
        torch.manual_seed(0)
        text = CLIPTextConfig(vocab_size=len(self.tokenizer), max_position_embeddings=77, hidden_act="quick_gelu",
                              **size["text"])  # fmt: skip
        self.text = CLIPTextModel(text).eval().requires_grad_(False)
        ch = size["vae"]
        self.vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(ch), up_block_types=("UpDecoderBlock2D",) * len(ch),
            block_out_channels=tuple(ch), layers_per_block=2, latent_channels=4, norm_num_groups=min(32, ch[0]),
            scaling_factor=0.18215, sample_size=size["sample_px"],
        ).eval().requires_grad_(False)  # fmt: skip
        self.width = size["text"]["hidden_size"]

    def unet(self, resolution: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_unet(self.cfg.unet, 4, resolution // 8, self.width)


def our_step(models: Models, batch: int, res: int, device: torch.device, compile_backend: str | None,
             attention: str = "sdpa") -> tuple[Callable[[], None], Callable[[], None], torch.nn.Module]:  # fmt: skip
    """ldm's step on cached latents z_0 and text embeddings: bf16 autocast, fused AdamW, EMA.
    Returns (step, forward_backward, unet)."""
    unet = models.unet(res).to(device, memory_format=torch.channels_last).train()
    set_attention_backend(unet, attention, device)
    model = torch.compile(unet, backend=compile_backend) if compile_backend else unet
    objective = build_objective(models.cfg.noise)
    params = list(unet.parameters())
    tc = models.cfg.train
    optimizer = adamw(params, tc.lr, (tc.adam_beta1, tc.adam_beta2), tc.weight_decay)
    ema = ema_for(params, tc.ema_decay, device)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(batch, 4, res // 8, res // 8, generator=g).to(device)  # the latent cache's
    with torch.no_grad():
        ids = models.tokenizer([CAPTION] * batch, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids  # fmt: skip
        context = models.text.to(device)(ids.to(device))[0]  # the text-embedding cache's
    models.text.to("cpu")

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = objective.loss(lambda z_t, t: model(z_t, t, encoder_hidden_states=context).sample, z0)
        loss.backward()

    def step() -> None:
        forward_backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)

    return step, forward_backward, unet


def reference_step(models: Models, batch: int, res: int, device: torch.device) -> Callable[[], None]:
    """What diffusers' train_text_to_image.py does per step (see the module docstring)."""
    unet = models.unet(res).to(device).train()
    vae, text = models.vae.to(device, torch.bfloat16), models.text.to(device, torch.bfloat16)
    scheduler = training_scheduler(models.cfg.noise)
    tc = models.cfg.train
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2),
                                  weight_decay=tc.weight_decay)  # fmt: skip
    ema = EMAModel(unet.parameters(), decay=tc.ema_decay)
    ema.to(device)
    pixels = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = [CAPTION] * batch
    gamma = models.cfg.noise.min_snr_gamma

    def step() -> None:
        ids = models.tokenizer(captions, max_length=77, padding="max_length", truncation=True,
                               return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            latents = (
                vae.encode(pixels.to(device, torch.bfloat16)).latent_dist.sample() * vae.config.scaling_factor
            )
            context = text(ids.to(device), return_dict=False)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = unet(noisy, t, context, return_dict=False)[0]
        if gamma:
            snr = compute_snr(scheduler, t)
            weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
            loss = (
                F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)) * weights
            ).mean()
        else:
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    return step


def largest_batch(models: Models, res: int, device: torch.device, size: dict) -> int:
    """The largest batch of ``size['batches']`` at which the reference's step fits."""
    for batch in size["batches"]:
        fresh(device)
        try:
            reference_step(models, batch, res, device)()
            return batch
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
        finally:
            models.vae.to("cpu", torch.float32)
            models.text.to("cpu", torch.float32)
    raise RuntimeError(f"no batch of {size['batches']} fits at {res} px")


def bench_train(models: Models, device: torch.device, size: dict, peak: float) -> list[dict]:
    rows = []
    for res in size["resolutions"]:
        batch = largest_batch(models, res, device, size)
        row: dict = {"resolution": res, "batch": batch}
        for name, backend in (("ours_eager", None), ("ours_compiled", size["backend"]), ("reference", None)):
            fresh(device)
            if name == "reference":
                step = reference_step(models, batch, res, device)
            else:
                step, forward_backward, _ = our_step(models, batch, res, device, backend)
            if name == "ours_eager":
                with FlopCounterMode(display=False) as counter:
                    forward_backward()
                row["flops_per_step"] = counter.get_total_flops()
            seconds = time_it(step, device, size["steps"], size["warmup"] + (2 if backend else 0))
            row[name] = {"step_s": seconds, "images_per_s": batch / seconds, "peak_memory_bytes": peak_bytes(device),
                         "mfu": row["flops_per_step"] / seconds / peak if name != "reference" else None}  # fmt: skip
            del step
            models.vae.to("cpu", torch.float32)
            models.text.to("cpu", torch.float32)
        row["ratio_eager"] = row["ours_eager"]["images_per_s"] / row["reference"]["images_per_s"]
        row["ratio_compiled"] = row["ours_compiled"]["images_per_s"] / row["reference"]["images_per_s"]
        say(f"train {res} px, batch {batch}: ours {row['ours_eager']['images_per_s']:.1f} (eager) / "
            f"{row['ours_compiled']['images_per_s']:.1f} (compiled) images/s, reference "
            f"{row['reference']['images_per_s']:.1f}; MFU {row['ours_compiled']['mfu']:.1%} compiled")  # fmt: skip
        rows.append(row)
    return rows


def bench_attention(models: Models, device: torch.device, size: dict) -> dict:
    res, batch = size["resolutions"][0], size["batches"][-1]
    rows = {}
    for backend in ("sdpa", "xformers", "math"):
        if backend == "xformers" and not (device.type == "cuda" and xformers_available()):
            rows[backend] = {
                "train_step_s": None,
                "sample_call_s": None,
                "skipped": "xformers not importable on CUDA",
            }
            continue
        fresh(device)
        step, _, unet = our_step(models, batch, res, device, None, attention=backend)
        train_s = time_it(step, device, size["steps"], size["warmup"])
        side = size["sample_px"] // 8
        z = torch.randn(
            2, 4, side, side, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32
        )
        context = torch.randn(2, 77, models.width, device=device, dtype=z.dtype)
        sampler_unet = unet.to(z.dtype).eval()
        with torch.inference_mode():
            call_s = time_it(
                functools.partial(sampler_unet, z, 500, context), device, size["steps"], size["warmup"]
            )
        rows[backend] = {"train_step_s": train_s, "sample_call_s": call_s, "skipped": None}
    base = rows["sdpa"]
    for r in rows.values():
        r["train_vs_sdpa"] = r["train_step_s"] / base["train_step_s"] if r["train_step_s"] else None
        r["sample_vs_sdpa"] = r["sample_call_s"] / base["sample_call_s"] if r["sample_call_s"] else None
    parts = [
        v["skipped"] or f"{k} train {v['train_vs_sdpa']:.2f}x, sample {v['sample_vs_sdpa']:.2f}x"
        for k, v in rows.items()
    ]
    say("attention against SDPA: " + "; ".join(parts))
    return {"resolution": res, "batch": batch, "backends": rows}


def save_pipeline(models: Models, folder: Path, px: int) -> None:
    scheduler = DDPMScheduler(**{k: v for k, v in training_scheduler(models.cfg.noise).config.items()
                                 if not k.startswith("_")})  # fmt: skip
    StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text, tokenizer=models.tokenizer, unet=models.unet(px),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)  # fmt: skip


def sample(pipe, prompts: list[str], **kwargs) -> torch.Tensor:
    return pipe(prompts, **kwargs).images


def bench_sampling(models: Models, device: torch.device, size: dict) -> dict:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    px, steps, guidance = size["sample_px"], size["sample_steps"], 7.5
    out: dict = {"resolution": px, "steps": steps, "sampler": "dpm++2m", "guidance": guidance,
                 "dtype": str(dtype).removeprefix("torch."), "rows": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ldm-gpu-") as tmp:
        save_pipeline(models, Path(tmp), px)
        for compiled in (False, True):
            fresh(device)
            ours = LatentDiffusionPipeline.from_pretrained(tmp, device=device, dtype=dtype, attention="sdpa")
            theirs = StableDiffusionPipeline.from_pretrained(tmp, safety_checker=None, dtype=dtype).to(device)
            theirs.scheduler = make_scheduler("dpm++2m", ours.scheduler_config)
            theirs.set_progress_bar_config(disable=True)
            if compiled:
                ours.unet = torch.compile(ours.unet, backend=size["backend"])
                theirs.unet = torch.compile(theirs.unet, backend=size["backend"])
            for batch in size["sample_batches"]:
                prompts = [CAPTION] * batch
                latents = torch.randn(batch, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(0))
                latents = latents.to(device, dtype)
                kwargs = {
                    "num_inference_steps": steps,
                    "guidance_scale": guidance,
                    "latents": latents,
                    "output_type": "pt",
                }

                run_ours = functools.partial(
                    sample, ours, prompts, sampler="dpm++2m", progress=False, **kwargs
                )
                run_theirs = functools.partial(sample, theirs, prompts, **kwargs)

                diff = (
                    (run_ours().float().cpu() - run_theirs().float().cpu()).abs().max().item()
                )  # warm-up too
                ours_s = time_it(run_ours, device, size["repeats"], 1 if compiled else 0)
                theirs_s = time_it(run_theirs, device, size["repeats"], 1 if compiled else 0)
                out["rows"].append({"batch": batch, "compiled": compiled, "ours_s": ours_s, "diffusers_s": theirs_s,
                                    "ratio": ours_s / theirs_s, "max_abs_image_diff": diff})  # fmt: skip
                say(f"sampling batch {batch}{' compiled' if compiled else ''}: ours {ours_s:.3f} s, diffusers "
                    f"{theirs_s:.3f} s ({ours_s / theirs_s:.2f}x; images differ by {diff:.1e})")  # fmt: skip
    eager = {r["batch"]: r for r in out["rows"] if not r["compiled"]}
    for r in out["rows"]:
        r["ours_vs_diffusers_eager"] = r["ours_s"] / eager[r["batch"]]["diffusers_s"]
    return out


def bench_sdxl_lora(device: torch.device, size: dict, tiny: bool) -> dict:
    cfg = load_config(LDMRunConfig, CONFIG_DIR / "ldm/sdxl-scratch.yaml", DATA + (TINY_SDXL if tiny else []))
    preset = load_config(LDMRunConfig, CONFIG_DIR / "ldm/sdxl-lora.yaml", DATA)
    fresh(device)
    torch.manual_seed(0)
    width, pooled = (32, 16) if tiny else (2048, 1280)
    unet = build_unet(cfg.unet, 4, size["sdxl_px"] // 8, width, pooled)
    if preset.unet.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device).train()
    set_attention_backend(unet, "auto" if device.type == "cuda" else "sdpa", device)
    params = add_lora(unet, [], preset.lora)
    tc = preset.train
    optimizer = make_optimizer(tc.optimizer, params, tc.lr, (tc.adam_beta1, tc.adam_beta2), tc.weight_decay)
    objective = build_objective(preset.noise)
    side = size["sdxl_px"] // 8
    z0 = torch.randn(tc.batch_size, 4, side, side, device=device)
    context = torch.randn(tc.batch_size, 77, width, device=device)
    added = {"text_embeds": torch.randn(tc.batch_size, pooled, device=device),
             "time_ids": torch.tensor([[size["sdxl_px"]] * 2 + [0, 0] + [size["sdxl_px"]] * 2] * tc.batch_size,
                                      device=device, dtype=torch.float32)}  # fmt: skip

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = objective.loss(
                lambda z_t, t: unet(z_t, t, encoder_hidden_states=context, added_cond_kwargs=added).sample, z0
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_it(step, device, size["steps"], size["warmup"])
    row = {"resolution": size["sdxl_px"], "batch": tc.batch_size, "rank": preset.lora.rank,
           "optimizer": tc.optimizer, "gradient_checkpointing": preset.unet.gradient_checkpointing,
           "trained_parameters": sum(p.numel() for p in params),
           "unet_parameters": sum(p.numel() for p in unet.parameters()),
           "step_s": seconds, "peak_memory_bytes": peak_bytes(device)}  # fmt: skip
    say(f"SDXL LoRA {row['resolution']} px, batch {row['batch']}: {seconds:.3f} s a step")
    return row


def bench_tiled_decode(models: Models, device: torch.device, size: dict) -> dict:
    vae = models.vae.to(device, torch.float16 if device.type == "cuda" else torch.float32)
    side = size["decode_px"] // 8
    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)).to(device, vae.dtype)
    out: dict = {"resolution": size["decode_px"], "tile": size["tile"]}
    with torch.inference_mode():
        for name, fn in (
            ("tiled", lambda: decode_tiled(vae, z, size["tile"])),
            ("untiled", lambda: vae.decode(z).sample),
        ):
            fresh(device)
            try:
                seconds = time_it(fn, device, 1, 0)
                out[name] = {"seconds": seconds, "peak_memory_bytes": peak_bytes(device), "oom": False}
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_oom(error):
                    raise
                out[name] = {"seconds": None, "peak_memory_bytes": peak_bytes(device), "oom": True}
    models.vae.to("cpu", torch.float32)
    say(
        f"decode {size['decode_px']} px: tiled {out['tiled']['seconds']:.2f} s, untiled "
        + ("out of memory" if out["untiled"]["oom"] else f"{out['untiled']['seconds']:.2f} s")
    )
    return out


def gib_text(peak: int | None) -> str:
    """ ", 12.3 GiB" of a CUDA peak; "" where none was measured (the CPU)."""
    return f", {peak / 2**30:.1f} GiB" if peak else ""


def table(results: dict) -> str:
    """The README's Markdown table of ``results``."""
    lines = ["| measurement | ours | reference | ratio |", "| --- | --- | --- | --- |"]
    for r in results.get("train", []):
        ref = r["reference"]
        for name in ("ours_eager", "ours_compiled"):
            o = r[name]
            mem, ref_mem = gib_text(o["peak_memory_bytes"]), gib_text(ref["peak_memory_bytes"])
            lines.append(f"| train {r['resolution']} px, batch {r['batch']}, {name.removeprefix('ours_')} | "
                         f"{o['images_per_s']:.1f} images/s{mem}, MFU {o['mfu']:.1%} | "
                         f"{ref['images_per_s']:.1f} images/s{ref_mem} | {o['images_per_s'] / ref['images_per_s']:.2f}x |")  # fmt: skip
    attention = results.get("attention")
    if attention:
        for k, v in attention["backends"].items():
            text = (
                v["skipped"]
                or f"train {v['train_step_s'] * 1000:.1f} ms, sample call {v['sample_call_s'] * 1000:.1f} ms"
            )
            ratio = f"{v['train_vs_sdpa']:.2f}x / {v['sample_vs_sdpa']:.2f}x" if v["train_vs_sdpa"] else "-"
            lines.append(f"| attention {k} | {text} | SDPA | {ratio} |")
    for r in results.get("sampling", {}).get("rows", []):
        lines.append(f"| sample {results['sampling']['resolution']} px, batch {r['batch']}"
                     f"{', compiled' if r['compiled'] else ''} | {r['ours_s']:.3f} s | {r['diffusers_s']:.3f} s | "
                     f"{r['ratio']:.2f}x |")  # fmt: skip
    sdxl = results.get("sdxl_lora")
    if sdxl:
        mem = gib_text(sdxl["peak_memory_bytes"])
        lines.append(
            f"| SDXL LoRA {sdxl['resolution']} px, batch {sdxl['batch']} | {sdxl['step_s']:.3f} s/step{mem} | - | - |"
        )
    tiles = results.get("tiled_decode")
    if tiles:
        untiled = "out of memory" if tiles["untiled"]["oom"] else f"{tiles['untiled']['seconds']:.2f} s"
        lines.append(
            f"| decode {tiles['resolution']} px | tiled {tiles['tiled']['seconds']:.2f} s | untiled {untiled} | - |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models on the CPU: the code paths, in a minute"
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or --tiny for the code paths on the CPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    size = SIZES["tiny" if args.tiny else "gpu"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    peak, peak_source = bf16_peak(device)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "tiny": args.tiny,
        "torch": torch.__version__, "bf16_peak_flops": peak, "bf16_peak_source": peak_source,
        "xformers": xformers_available(),
    }  # fmt: skip
    models = Models(size, args.tiny)
    runs = {"train": lambda: bench_train(models, device, size, peak),
            "attention": lambda: bench_attention(models, device, size),
            "sampling": lambda: bench_sampling(models, device, size),
            "sdxl_lora": lambda: bench_sdxl_lora(device, size, args.tiny),
            "tiled_decode": lambda: bench_tiled_decode(models, device, size)}  # fmt: skip
    for name in args.sections:
        results[name] = runs[name]()
        results["seconds"] = time.perf_counter() - start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(results, indent=2) + "\n"
        )  # after each section: a partial run keeps its figures
    say(table(results))
    say(f"{results['seconds']:.0f} s in all; {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
