"""Stage 2 after training: the export (full pipeline or LoRA), the token record, the evaluation."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from conditioning.new_tokens import fuse_new_tokens
from conditioning.vocabulary import save_trained_tokens
from ldm.eval.plots import plot_losses
from ldm.models.lora import KOHYA_WEIGHTS, PEFT_KINDS, save_kohya_lora, save_lora, save_peft_adapters
from ldm.pipelines.export import export_pipeline
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.single_file import SINGLE_FILE
from ldm.train.config import LDMRunConfig
from ldm.train.evaluate import evaluate_run, save_prompt_grid

logger = logging.getLogger("ldm")
EMBEDDINGS = "embeddings"  # out/embeddings/<token>.safetensors: textual inversion's files


def exports_model(cfg: LDMRunConfig) -> bool:
    """Whether the run writes ``model/``: full fine-tuning does; LoRA with ``lora.merge``, textual
    inversion alone with ``ti.merge`` (else they write their adapters or embeddings only)."""
    if cfg.lora.rank:
        return cfg.lora.merge
    return cfg.ti.merge if cfg.ti.tokens else True


def export_and_evaluate(
    pipe: LatentDiffusionPipeline, cfg: LDMRunConfig, out: Path, val_set: Dataset, prompts: list[str],
    tokens: set[int] | None,
) -> dict:  # fmt: skip
    """``out/model`` (a diffusers pipeline folder, and ``out/model.safetensors`` with
    ``export.single_file``; with LoRA ``out/lora``, and the merged model when ``lora.merge``), the scratch text encoder's ``trained_tokens.json`` (``tokens``), the final grid,
    ``report.md`` and the loss curves; returns the evaluation's figures."""
    for module in (pipe.unet, *pipe.text_encoders):
        module.eval()
        module.to(torch.float32)  # mixed precision kept frozen weights in half (cast_frozen): export float32
    if cfg.lora.rank:
        texts = pipe.text_encoders if cfg.lora.text_encoder else [None, None]
        second = texts[1] if pipe.is_sdxl else None
        if cfg.lora.kind in PEFT_KINDS:  # LoHa, LoKr: peft's layout (diffusers' LoRA files hold neither)
            parts = {"unet": pipe.unet, "text_encoder": texts[0], "text_encoder_2": second}
            save_peft_adapters(out / "lora", parts)
            logger.info("exported %s adapters in peft's layout to %s", cfg.lora.kind, out / "lora")
        elif cfg.lora.format in ("diffusers", "both"):
            save_lora(out / "lora", pipe.unet, texts[0], second, sdxl=pipe.is_sdxl)
            logger.info("exported LoRA weights to %s", out / "lora")
        if cfg.lora.format in ("kohya", "both"):
            path = save_kohya_lora(out / "lora" / KOHYA_WEIGHTS, pipe.unet, texts[0], second)
            logger.info("exported LoRA weights in kohya's layout to %s", path)
    if cfg.ti.tokens:  # textual inversion / pivotal tuning: the new tokens' rows
        files = pipe.save_textual_inversion(out / EMBEDDINGS, cfg.ti.tokens)
        logger.info("exported the new tokens' embeddings to %s", ", ".join(str(f) for f in files))
    if exports_model(cfg):
        if cfg.lora.rank:
            pipe.fuse_lora()
        for model in pipe.text_encoders:  # new tokens: plain embedding tables of V + n rows
            fuse_new_tokens(model)
        export_pipeline(pipe, out / "model")
        if cfg.export.single_file:
            path = pipe.save_single_file(out / SINGLE_FILE, cfg.export.dtype)
            logger.info("exported the single file %s (%s)", path, cfg.export.dtype)
    if tokens is not None and (out / "model").exists():
        save_trained_tokens(out / "model" / "text_encoder", tokens)
    save_prompt_grid(pipe, prompts, cfg, out / "samples" / "final.png")
    results = evaluate_run(pipe, val_set, cfg, out)
    plot_losses(out / "metrics.jsonl", out / "losses.png")
    return results
