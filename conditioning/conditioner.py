"""The Conditioner: per-item conditions (captions) -> the UNet's keyword arguments.

It owns what the UNet is conditioned on, for training and sampling alike: tokenization, the encoders
(one or several; their contexts are concatenated along the width, as SDXL does), condition dropout,
the unconditional input for guidance, and the caption cache (keyed by the caption).

    Conditioning = {"encoder_hidden_states": (B, L, D)}    # cross-attention context, and later
                   {"text_embeds": (B, P), ...}              # pooled embeddings (added_cond_kwargs)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from conditioning.cache import CaptionCache
from conditioning.config import TextEncoderConfig
from conditioning.dropout import NULL_CAPTION, drop_captions
from conditioning.encoders import TextEncoder, build_text_encoder

Conditioning = dict[str, Tensor]  # batch-first condition tensors
CONTEXT = "encoder_hidden_states"


class Conditioner(nn.Module):
    """Captions -> ``Conditioning`` -> UNet keyword arguments (``unet_kwargs``)."""

    def __init__(self, encoders: Sequence[TextEncoder], p_uncond: float = 0.0):
        super().__init__()
        if not encoders:
            raise ValueError("a Conditioner needs at least one text encoder")
        self.encoders = nn.ModuleList(encoders)
        self.p_uncond = p_uncond
        self.cache: CaptionCache | None = None  # set by training_conditions

    @property
    def trainable(self) -> bool:
        return any(e.trainable for e in self.encoders)

    @trainable.setter
    def trainable(self, value: bool) -> None:
        for e in self.encoders:
            e.trainable = value

    @property
    def hidden_size(self) -> int:
        """Context width D (the UNet's ``cross_attention_dim``): the encoders' widths summed."""
        return sum(e.hidden_size for e in self.encoders)

    @property
    def device(self) -> torch.device:
        return self.encoders[0].device

    def train(self, mode: bool = True) -> Conditioner:
        for e in self.encoders:
            e.train(mode)
        self.training = mode
        return self

    # --- captions -> token ids -> conditioning ----------------------------------------------
    def tokenize(self, captions: list[str]) -> list[Tensor]:
        """Token ids on the CPU, one (B, L_i) per encoder."""
        return [e.tokenize(captions) for e in self.encoders]

    def forward(self, token_ids: Sequence[Tensor], deduplicate: bool = False) -> Conditioning:
        """Token ids (one (B, L_i) per encoder) -> conditioning. ``deduplicate``: each distinct caption
        encoded once (the same values and gradients; see ``TextEncoder.forward``)."""
        contexts = [
            e(ids.to(e.device), deduplicate=deduplicate)
            for e, ids in zip(self.encoders, token_ids, strict=True)
        ]
        return {CONTEXT: contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=-1)}  # (B, L, D)

    def encode(self, captions: list[str]) -> Conditioning:
        return self(self.tokenize(captions))

    def unconditional(self, n: int) -> Conditioning:
        """The condition of the empty caption, what condition dropout trains and guidance subtracts."""
        return self.encode([NULL_CAPTION] * n)

    def drop(
        self, captions: list[str], uniform: Tensor | None = None, generator: torch.Generator | None = None
    ) -> list[str]:
        """Condition dropout: each caption replaced by "" with probability ``p_uncond``."""
        return drop_captions(list(captions), self.p_uncond, generator, uniform=uniform)

    # --- the UNet's side ---------------------------------------------------------------------
    @staticmethod
    def unet_kwargs(cond: Conditioning) -> dict:
        """The keyword arguments of ``UNet2DConditionModel.forward`` for ``cond``."""
        kwargs: dict = {"encoder_hidden_states": cond[CONTEXT]}
        added = {k: v for k, v in cond.items() if k != CONTEXT}
        if added:
            kwargs["added_cond_kwargs"] = added
        return kwargs

    @staticmethod
    def cast(cond: Conditioning, dtype: torch.dtype) -> Conditioning:
        return {k: v.to(dtype) for k, v in cond.items()}

    # --- caching: the key is the caption itself ------------------------------------------------
    def training_conditions(
        self, forward: Callable[..., Conditioning], on_tokens: Callable[[list[Tensor]], None] | None = None
    ) -> Callable[[list[str]], Conditioning]:
        """captions -> conditioning inside a training step. A frozen conditioner's values are cached
        per distinct caption; a trained one caches the token ids and runs ``forward`` (the conditioner
        as ``accelerator.prepare`` returned it) with deduplication. ``on_tokens`` sees fresh ids."""
        if not self.trainable:
            values = CaptionCache(self.encode)
            self.cache = values
            return values

        def tokenize(captions: list[str]) -> dict[str, Tensor]:
            ids = self.tokenize(captions)
            if on_tokens is not None:
                on_tokens(ids)
            return {str(i): t for i, t in enumerate(ids)}

        tokens = CaptionCache(tokenize)
        self.cache = tokens

        def conditions(captions: list[str]) -> Conditioning:
            ids = tokens(captions)
            return forward([ids[str(i)] for i in range(len(self.encoders))], deduplicate=True)

        return conditions


def build_conditioner(cfg: TextEncoderConfig, allow_pickle: bool = False) -> Conditioner:
    """The conditioner ``cfg`` describes: its text encoder and condition dropout."""
    return Conditioner([build_text_encoder(cfg, allow_pickle)], cfg.p_uncond)
