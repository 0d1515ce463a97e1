"""Text encoders: captions -> cross-attention context (B, L, D) for the UNet (Rombach et al. 2022, sec. 3.3).

Every encoder is a ``transformers.CLIPTextModel`` with its tokenizer, whatever its origin:

- ``scratch``: a small CLIP text transformer with random init, trained with the UNet;
- ``clip``: a pretrained ``CLIPTextModel`` from a local folder or the hub (a pipeline's ``text_encoder/``
  or a plain model folder), frozen by default;
- ``openclip``: an OpenCLIP model's text tower converted to ``CLIPTextModel`` (``conditioning.openclip``),
  frozen by default.

The context is the model's ``last_hidden_state``, i.e. after ``final_layer_norm``. ``layer="penultimate"``
(Stable Diffusion 2) drops the last transformer layer from the model itself, so that the exported
``text_encoder/`` computes the same context in any diffusers pipeline. SDXL instead reads
``hidden_states[-2]`` (before ``final_layer_norm``) of the full model (``hidden_layer=-2``), and the
pooled embedding of a ``CLIPTextModelWithProjection`` (``text_embeds``), so its models stay whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from conditioning.config import TextEncoderConfig
from conditioning.new_tokens import expand_multi_vector
from conditioning.openclip import load_open_clip_text
from conditioning.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    build_clip_tokenizer,
    clean_caption,
)
from ldm.core.config import check_choice
from ldm.core.errors import ConfigError, MissingFileError
from ldm.core.safe_load import PICKLE_SUFFIXES, from_pretrained_kwargs, pickle_refused

logger = logging.getLogger(__name__)

MODEL_FILES = ("model.safetensors", "model.safetensors.index.json")  # a CLIPTextModel's weights
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either makes a folder a tokenizer folder
PIPELINE_TEXT_ENCODER = "text_encoder"  # subfolders of a diffusers pipeline folder
PIPELINE_TOKENIZER = "tokenizer"


class TextEncoder(nn.Module):
    """Captions -> context (B, L, D) and pooled embedding (B, P): a CLIP text model and its tokenizer.

    ``hidden_layer``: None, the context is ``last_hidden_state`` (after ``final_layer_norm``); -2,
    ``hidden_states[-2]`` as it is (SDXL's two encoders). The pooled embedding is ``text_embeds`` of a
    ``CLIPTextModelWithProjection`` (SDXL's second encoder), else ``pooler_output``.

    A frozen encoder (``trainable=False``) has ``requires_grad`` off, stays in eval mode through
    ``.train()``, and runs without autograd; with ``freeze=False`` the model's flags are left as they are
    (a pipeline's view of a model that may be training elsewhere).
    """

    def __init__(
        self,
        model: CLIPTextModel | CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        max_length: int,
        trainable: bool,
        freeze: bool = True,
        hidden_layer: int | None = None,
    ):
        super().__init__()
        positions = model.config.max_position_embeddings
        if max_length > positions:
            raise ConfigError(
                f"config key 'text.max_length' is {max_length}; this text encoder has {positions} positions"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.model_max_length = max_length  # diffusers pads prompts to model_max_length
        self.max_length = max_length
        self.trainable = trainable
        self.hidden_layer = hidden_layer
        self._warned_long = False
        if not trainable and freeze:  # freeze=False: a view over a model whose owner sets its mode
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    @property
    def hidden_size(self) -> int:
        """Context width D (the UNet's ``cross_attention_dim``)."""
        return self.model.config.hidden_size

    @property
    def pooled_size(self) -> int:
        """Width P of the pooled embedding: the projection's for a ``CLIPTextModelWithProjection``."""
        if hasattr(self.model, "text_projection"):
            return self.model.config.projection_dim
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, captions: list[str]) -> Tensor:
        """Captions -> token ids (B, max_length) on the CPU: OpenCLIP's cleaning, start/end tokens, padding."""
        texts = [expand_multi_vector(clean_caption(c), self.tokenizer) for c in captions]
        batch = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        if not self._warned_long:
            long = [
                t
                for t, ids in zip(texts, self.tokenizer(texts).input_ids, strict=True)
                if len(ids) > self.max_length
            ]
            if long:
                self._warned_long = True
                logger.warning(
                    "%d caption(s) are longer than the text encoder's %d tokens and are truncated (warned once), "
                    "e.g. %r", len(long), self.max_length, long[0][:120],
                )  # fmt: skip
        return batch.input_ids  # (B, L)

    def forward(self, input_ids: Tensor, deduplicate: bool = False) -> Tensor:
        """Token ids (B, L) -> context (B, L, D): the last hidden state, after ``final_layer_norm``.

        ``deduplicate``: encode each distinct row once and gather, context = f(unique rows)[inverse]:
        the same values and (summed through the gather) the same gradients, fewer FLOPs when captions
        repeat within a batch, as the dropped caption "" always does.
        """
        return self.outputs(input_ids, deduplicate)[0]

    def outputs(self, input_ids: Tensor, deduplicate: bool = False) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) -> (context (B, L, D), pooled embedding (B, P)); ``deduplicate`` as ``forward``."""
        if deduplicate:
            unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
            if len(unique) < len(input_ids):
                context, pooled = self.outputs(unique)
                return context[inverse], pooled[inverse]  # (B, L, D), (B, P)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.model(input_ids=input_ids, output_hidden_states=self.hidden_layer is not None)
        context = out.last_hidden_state if self.hidden_layer is None else out.hidden_states[self.hidden_layer]
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return context, pooled  # (B, L, D), (B, P)

    def encode(self, captions: list[str]) -> Tensor:
        """Captions -> context (B, L, D) on the model's device."""
        return self(self.tokenize(captions).to(self.device))

    def save(self, folder: str | Path) -> None:
        """Write ``folder/text_encoder/`` (config + safetensors) and ``folder/tokenizer/``, as in a diffusers pipeline."""
        folder = Path(folder)
        self.model.save_pretrained(folder / PIPELINE_TEXT_ENCODER)
        self.tokenizer.save_pretrained(folder / PIPELINE_TOKENIZER)


def drop_last_layer(model: CLIPTextModel) -> CLIPTextModel:
    """Keep all but the last transformer layer (in place), the Stable Diffusion 2 "penultimate" context.

    ``last_hidden_state`` then equals ``final_layer_norm(hidden_states[-2])`` of the full model, which
    is what diffusers computes with ``clip_skip=1``; SD 2's own ``text_encoder/`` is stored this way.
    """
    body = getattr(model, "text_model", model)  # transformers < 5 nests the modules under .text_model
    n = len(body.encoder.layers)
    if n < 2:
        raise ConfigError(
            f"text.layer=penultimate needs a text encoder with 2 or more layers; this one has {n}"
        )
    body.encoder.layers = body.encoder.layers[:-1]
    model.config.num_hidden_layers = n - 1
    return model


def _offline() -> bool:
    """Whether the hub must not be contacted (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag in ("1", "true", "yes", "on") for flag in flags)


def _is_local(name_or_path: str) -> bool:
    """A local path rather than a hub id: it exists, or it is not of the form "org/name"."""
    path = Path(name_or_path).expanduser()
    return (
        path.exists()
        or path.is_absolute()
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") != 1
    )


def _has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in MODEL_FILES)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _local_model_dir(folder: Path, allow_pickle: bool = False) -> Path:
    """``folder`` or ``folder/text_encoder``, whichever holds a CLIPTextModel; else a clear error."""
    if not folder.is_dir():
        raise MissingFileError(f"no CLIP text encoder at {folder}: the folder does not exist")
    candidates = [folder / PIPELINE_TEXT_ENCODER, folder]
    for candidate in candidates:
        if _has_model(candidate):
            return candidate
    pickles = [p for c in candidates for p in c.glob("pytorch_model*.bin")]
    if pickles and allow_pickle:
        return pickles[0].parent
    if pickles:
        raise pickle_refused(pickles[0])
    hint = " (a diffusers pipeline folder, or a CLIPTextModel saved with save_pretrained)"
    looked = " and ".join(f"{c}/{{config.json, {' | '.join(MODEL_FILES)}}}" for c in candidates)
    raise MissingFileError(f"no CLIP text encoder in {folder}: looked for {looked}{hint}")


def _local_tokenizer(folder: Path, model_dir: Path, max_length: int) -> CLIPTokenizer:
    """The tokenizer next to a local model: pipeline ``tokenizer/``, the folder itself, else the CLIP BPE."""
    candidates = [folder / PIPELINE_TOKENIZER, model_dir.parent / PIPELINE_TOKENIZER, model_dir, folder]
    for candidate in dict.fromkeys(candidates):  # ordered, without repeats
        if _has_tokenizer(candidate):
            return CLIPTokenizer.from_pretrained(candidate, local_files_only=True)
    logger.warning(
        "no tokenizer in %s (looked in %s); using the CLIP BPE tokenizer from open_clip's vocabulary, "
        "which pads with '!' (id 0): check this matches how the model was trained",
        folder,
        ", ".join(str(c) for c in dict.fromkeys(candidates)),
    )
    return build_clip_tokenizer(max_length)


def _hub_first(load: Callable[..., Any], repo: str, subfolders: tuple[str, ...], offline: bool) -> Any:
    """``load(repo, subfolder=s)`` for the first subfolder that works; an error naming all tries if none does."""
    errors = []
    for subfolder in subfolders:
        try:
            return load(repo, subfolder=subfolder, local_files_only=offline)
        except (OSError, ValueError) as err:
            first_line = (str(err).splitlines() or [type(err).__name__])[0]
            errors.append(f"{repo}/{subfolder or '.'}: {first_line}")
    where = " (offline: only the local hub cache was searched)" if offline else ""
    raise MissingFileError(
        f"no local folder {repo!r}, and could not load it as a hub id{where}: " + "; ".join(errors)
    )


def _model_class(cfg: TextEncoderConfig) -> type[CLIPTextModel] | type[CLIPTextModelWithProjection]:
    return CLIPTextModelWithProjection if cfg.with_projection else CLIPTextModel


def _load_clip(cfg: TextEncoderConfig, allow_pickle: bool = False) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A pretrained ``CLIPTextModel`` and its tokenizer from a local folder or a hub id (safetensors,
    or pickle weights read with weights_only=True when ``allow_pickle``)."""
    source = str(cfg.name_or_path)
    weights = from_pretrained_kwargs(allow_pickle)
    if _is_local(source):
        folder = Path(source).expanduser()
        model_dir = _local_model_dir(folder, allow_pickle)
        model = _model_class(cfg).from_pretrained(model_dir, local_files_only=True, **weights)
        tokenizer = _local_tokenizer(folder, model_dir, cfg.max_length)
        logger.info("loaded the CLIP text encoder from %s", model_dir)
        return model, tokenizer
    offline = _offline()

    def load_model(repo: str, **kwargs: Any) -> CLIPTextModel:
        return _model_class(cfg).from_pretrained(repo, **weights, **kwargs)

    model = _hub_first(load_model, source, ("", PIPELINE_TEXT_ENCODER), offline)
    try:
        tokenizer = _hub_first(CLIPTokenizer.from_pretrained, source, (PIPELINE_TOKENIZER, ""), offline)
    except FileNotFoundError as err:
        logger.warning("%s; using the CLIP BPE tokenizer from open_clip's vocabulary (pad '!')", err)
        tokenizer = build_clip_tokenizer(cfg.max_length)
    logger.info("loaded the CLIP text encoder %s from the hub", source)
    return model, tokenizer


def _build_scratch(cfg: TextEncoderConfig, allow_pickle: bool = False) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A small CLIP text transformer with random init and the CLIP BPE tokenizer (pad '!' = id 0)."""
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        hidden_act="quick_gelu",
        projection_dim=cfg.hidden_size,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    model_class = CLIPTextModelWithProjection if cfg.with_projection else CLIPTextModel
    return model_class(config), build_clip_tokenizer(cfg.max_length)


def _load_openclip(cfg: TextEncoderConfig, allow_pickle: bool = False) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """An OpenCLIP text tower converted to ``CLIPTextModel``, with the CLIP BPE tokenizer (pad '!', as OpenCLIP).
    A local weights file must be safetensors unless ``allow_pickle`` (open_clip reads it with weights_only=True)."""
    if cfg.pretrained and Path(cfg.pretrained).suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise pickle_refused(cfg.pretrained)
    return load_open_clip_text(str(cfg.name_or_path), cfg.pretrained), build_clip_tokenizer(cfg.max_length)


TEXT_ENCODERS: dict[str, Callable[[TextEncoderConfig, bool], tuple[CLIPTextModel, CLIPTokenizer]]] = {
    "scratch": _build_scratch,
    "clip": _load_clip,
    "openclip": _load_openclip,
}


def build_text_encoder(cfg: TextEncoderConfig, allow_pickle: bool = False) -> TextEncoder:
    """The text encoder ``cfg`` describes, on the CPU in float32; frozen unless ``cfg.trainable``.
    ``allow_pickle``: pretrained pickle weights may be read (with weights_only=True); see ``ldm.core.safe_load``."""
    check_choice("text.kind", cfg.kind, tuple(TEXT_ENCODERS))
    model, tokenizer = TEXT_ENCODERS[cfg.kind](cfg, allow_pickle)
    if cfg.layer == "penultimate":
        drop_last_layer(model)
    encoder = TextEncoder(model.float(), tokenizer, max_length=cfg.max_length, trainable=cfg.trainable)
    logger.info(
        "text encoder: %s, %d layers, width %d, %.2fM parameters, %s",
        cfg.kind,
        model.config.num_hidden_layers,
        encoder.hidden_size,
        sum(p.numel() for p in model.parameters()) / 1e6,
        "trained" if cfg.trainable else "frozen",
    )
    return encoder
