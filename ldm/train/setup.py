"""Stage 2's models before training: on the device, and which of their parameters train."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from conditioning import Conditioner
from conditioning.conditioner import unreached_parameters
from conditioning.new_tokens import add_new_tokens, new_rows, vector_names
from conditioning.vocabulary import load_trained_tokens
from ldm.core.randomness import seeded_on_every_process
from ldm.models.lora import add_lora
from ldm.models.unet import set_attention_backend
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.train.config import LDMRunConfig
from ldm.train.data import caption_tokens
from ldm.train.models import build_models, make_conditioner
from ldm.train.trained import TrainedModules
from ldm.training.engine import broadcast_weights, callable_units
from ldm.training.run import global_batch_line

logger = logging.getLogger("ldm")


def models_on_device(
    cfg: LDMRunConfig, device: torch.device, memory_format: torch.memory_format
) -> tuple[AutoencoderKL, Path, Conditioner, UNet2DConditionModel]:
    """(frozen autoencoder, its folder, conditioner, UNet) on ``device``, attention backend set; what
    starts random starts the same on every process."""
    with seeded_on_every_process(cfg.seed):
        vae, vae_dir, encoders, unet = build_models(cfg)
    for e in encoders:  # textual inversion: the new tokens' rows, in every encoder (SDXL: both)
        if cfg.ti.tokens:
            add_new_tokens(e.model, e.tokenizer, cfg.ti.tokens, cfg.ti.init, cfg.ti.vectors)
    vae.to(device).eval().requires_grad_(False)
    conditioner = make_conditioner(cfg, [e.to(device) for e in encoders])
    unet = unet.to(device, memory_format=memory_format)
    set_attention_backend(unet, cfg.unet.attention, device)
    return vae, vae_dir, conditioner, unet


def trainable_parameters(
    cfg: LDMRunConfig, unet: UNet2DConditionModel, conditioner: Conditioner
) -> list[torch.nn.Parameter]:
    """LoRA adapters (``lora.rank`` > 0; the base weights stay frozen), or the whole UNet and, when it
    learns, the text encoder; with ``ti.tokens``, the new tokens' rows too (last), and without LoRA
    only those (textual inversion: the UNet frozen)."""
    rows = [r for e in conditioner.encoders if (r := new_rows(e.model)) is not None]
    if cfg.lora.rank:
        trainable = add_lora(unet, [e.model for e in conditioner.encoders], cfg.lora)
        conditioner.trainable = cfg.lora.text_encoder or bool(rows)  # its forward then runs with autograd
        unreached = {id(p) for e in conditioner.encoders for p in unreached_parameters(e)}
        for p in trainable:  # adapters past SDXL's hidden_states[-2] would never get a gradient (DDP)
            if id(p) in unreached:
                p.requires_grad_(False)
        trainable = [p for p in trainable if id(p) not in unreached]
    elif rows:  # textual inversion alone: the networks stay as they are
        unet.requires_grad_(False)
        conditioner.trainable, trainable = True, []
    else:
        return list(unet.parameters()) + (list(conditioner.parameters()) if conditioner.trainable else [])
    for r in rows:
        r.requires_grad_(True)
    return trainable + rows


def parameter_groups(cfg: LDMRunConfig, trainable: list[torch.nn.Parameter], conditioner: Conditioner):
    """The optimizer's parameter groups: the new tokens' rows (``ti.lr``, no weight decay: it would pull
    them toward zero, away from the vocabulary's scale) apart from the rest."""
    rows = {id(r) for e in conditioner.encoders if (r := new_rows(e.model)) is not None}
    if not rows:
        return trainable
    rest = [p for p in trainable if id(p) not in rows]
    tokens = {"params": [p for p in trainable if id(p) in rows], "weight_decay": 0.0}
    if cfg.ti.lr is not None:  # (the lr schedule scales both groups alike)
        tokens |= {"lr": cfg.ti.lr, "lr_scale": cfg.ti.lr / cfg.train.lr}
    return ([{"params": rest}] if rest else []) + [tokens]


def new_token_ids(cfg: LDMRunConfig, conditioner: Conditioner) -> set[int]:
    """The ids of the new tokens' rows in the first tokenizer (learned by design: no preflight warning)."""
    names = [n for token in cfg.ti.tokens for n in vector_names(token, cfg.ti.vectors)]
    return set(conditioner.encoders[0].tokenizer.convert_tokens_to_ids(names)) if names else set()


def cast_frozen(
    cfg: LDMRunConfig, unet: UNet2DConditionModel, conditioner: Conditioner, trainable: list
) -> None:
    """Under mixed precision, keep what does not train in its half dtype (the UNet's base weights under
    LoRA, frozen text encoders): half the memory, as diffusers' training examples do. What trains stays
    float32 (autocast computes in the half dtype); the autoencoder stays float32 (SDXL's overflows in
    float16)."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    if half is None:
        return
    modules = [e.model for e in conditioner.encoders if not e.trainable]
    if cfg.lora.rank or cfg.ti.tokens:  # frozen base weights (textual inversion: every network)
        modules = [unet, *(e.model for e in conditioner.encoders)]
    if cfg.ti.tokens and cfg.ti.merge:  # model/ is the base itself: its weights must not be rounded
        modules = []
    for module in modules:
        module.to(half)
    for p in trainable:  # the adapters (and anything trained inside those modules) back to float32
        p.data = p.data.float()
    logger.info("frozen weights kept in %s (%d modules)", half, len(modules))


def prepare(accelerator, unet: UNet2DConditionModel, conditioner: Conditioner, optimizer):
    """(trained modules, optimizer, trained parameters) through ``accelerator.prepare``: the UNet and a
    trained conditioner as one module (``TrainedModules``), a frozen conditioner left out. The
    parameters are the module's after ``prepare``, by name (FSDP replaces them with shards; DeepSpeed's
    optimizer holds flat partitions instead of them)."""
    trained = TrainedModules(unet, conditioner if conditioner.trainable else None)
    texts = [e.model for e in conditioner.encoders] if conditioner.trainable else []
    callable_units(accelerator, [unet, *texts])  # FSDP: each its own unit, which sampling can call
    broadcast_weights(accelerator, trained)  # FSDP: the main process's initial weights everywhere
    name_of = {id(p): name for name, p in trained.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]  # their order
    trained, optimizer = accelerator.prepare(trained, optimizer)
    after = dict(accelerator.unwrap_model(trained).named_parameters())
    return trained, optimizer, [after[name] for name in names]


def training_pipeline(
    vae, conditioner: Conditioner, unet, objective, text_models: list | None = None
) -> LatentDiffusionPipeline:
    """A pipeline over the modules being trained (no copies), for grids and the export; ``text_models``
    in place of the conditioner's (whole copies of sharded ones, ``ldm.train.whole``)."""
    text = conditioner.encoders[0]
    models = text_models or [e.model for e in conditioner.encoders]
    second = {}
    if len(conditioner.encoders) > 1:  # SDXL
        text_2 = conditioner.encoders[1]
        second = {
            "text_encoder_2": models[1],
            "tokenizer_2": text_2.tokenizer,
            "force_zeros_for_empty_prompt": conditioner.zero_uncond,
        }
    return LatentDiffusionPipeline(
        vae, models[0], text.tokenizer, unet, objective.scheduler_config(), **second
    )


class TokenRecord:
    """The token ids a scratch text encoder has trained on (``text_encoder/trained_tokens.json``):
    the pretrained record, plus every caption it trains on in this run."""

    def __init__(self, prior: set[int] | None, enabled: bool, training: bool = False):
        self.prior, self.enabled, self.training = prior, enabled, training
        self.seen: set[int] = set()

    @classmethod
    def of_run(cls, cfg: LDMRunConfig) -> TokenRecord:
        """A pretrained model's record, or an empty one for a fresh scratch encoder (``enabled``);
        pretrained CLIP-type encoders saw the whole vocabulary and keep none."""
        prior = load_trained_tokens(Path(cfg.pretrained) / "text_encoder") if cfg.pretrained else None
        return cls(prior, prior is not None or (not cfg.pretrained and cfg.text.kind == "scratch"))

    def __call__(self, ids: list[torch.Tensor]) -> None:  # the conditioner's fresh token ids
        if self.enabled and self.training:
            self.seen.update(ids[0].unique().tolist())

    def final(self, conditioner: Conditioner, train_set) -> set[int] | None:
        if not self.enabled:
            return None
        from_run = caption_tokens(conditioner, train_set, self.seen) if self.training else set()
        return (self.prior or set()) | from_run


def log_plan(cfg: LDMRunConfig, trainable: list, train_text: bool, objective: str, processes: int) -> None:
    tc = cfg.train
    logger.info(
        "training %.3fM parameters (%s; text encoder %s; %s) for %d steps, %s",
        sum(p.numel() for p in trainable) / 1e6, plan_line(cfg),
        "trained" if train_text else "frozen", objective, tc.max_steps,
        global_batch_line(tc.batch_size, processes, tc.gradient_accumulation_steps),
    )  # fmt: skip


def plan_line(cfg: LDMRunConfig) -> str:
    what = f"LoRA rank {cfg.lora.rank}" if cfg.lora.rank else "full UNet"
    if cfg.ti.tokens:
        vectors = f", {cfg.ti.vectors} vectors each" if cfg.ti.vectors > 1 else ""
        tokens = f"new tokens {', '.join(cfg.ti.tokens)}{vectors}"
        what = f"{what} + {tokens} (pivotal tuning)" if cfg.lora.rank else f"textual inversion: {tokens}"
    return what
