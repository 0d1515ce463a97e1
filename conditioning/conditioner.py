"""The Conditioner: per-item conditions (captions) -> the UNet's keyword arguments.

It owns what the UNet is conditioned on, for training and sampling alike: tokenization, the encoders
(one or several; their contexts are concatenated along the width, as SDXL does), the pooled embedding,
the micro-conditioning, condition dropout, the unconditional input for guidance, and the caption
cache (keyed by the caption).

    Conditioning = {"encoder_hidden_states": (B, L, D),   # cross-attention context
                    "text_embeds": (B, P),                # SDXL: encoder 2's pooled embedding
                    "time_ids": (B, 6)}                   # SDXL: the micro-conditioning

SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis", sec. 2.2) conditions on each training image's original size (h, w), the top-left corner
of its crop (top, left) and the target size (h, w): ``time_ids`` = [h_orig, w_orig, top, left, h, w].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from conditioning.cache import CaptionCache
from conditioning.config import TextEncoderConfig
from conditioning.dropout import NULL_CAPTION, drop_captions, uncond_mask
from conditioning.encoders import TextEncoder, build_text_encoder

Conditioning = dict[str, Tensor]  # batch-first condition tensors
CONTEXT = "encoder_hidden_states"
POOLED = "text_embeds"
TIME_IDS = "time_ids"
# per item, from the data pipeline: (h, w) of the image before resizing; (top, left) of the crop
MICRO_KEYS = ("original_size", "crop_top_left")


def time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """SDXL's micro-conditioning (B, 6) = [h_orig, w_orig, top, left, h_target, w_target], float32;
    each argument (B, 2) or (2,) (broadcast)."""
    parts = [torch.as_tensor(x, dtype=torch.float32) for x in (original_size, crop_top_left, target_size)]
    batch = max(p.shape[0] if p.ndim == 2 else 1 for p in parts)
    return torch.cat([p.reshape(-1, 2).expand(batch, 2) for p in parts], dim=-1)  # (B, 6)


class Conditioner(nn.Module):
    """Captions (and, with micro-conditioning, sizes) -> ``Conditioning`` -> UNet keyword arguments.

    ``pooled_from``: the encoder whose pooled embedding is ``text_embeds`` (SDXL: 1, the second);
    ``micro_conditioning``: ``time_ids`` from each item's size and crop; ``zero_uncond``: the
    unconditional input is all zeros, context and pooled alike (diffusers' SDXL
    ``force_zeros_for_empty_prompt``), in condition dropout and as the default negative prompt.
    """

    def __init__(
        self,
        encoders: Sequence[TextEncoder],
        p_uncond: float = 0.0,
        pooled_from: int | None = None,
        micro_conditioning: bool = False,
        zero_uncond: bool = False,
    ):
        super().__init__()
        if not encoders:
            raise ValueError("a Conditioner needs at least one text encoder")
        if pooled_from is not None and not 0 <= pooled_from < len(encoders):
            raise ValueError(f"pooled_from={pooled_from}: there are {len(encoders)} encoders")
        self.encoders = nn.ModuleList(encoders)
        self.p_uncond = p_uncond
        self.pooled_from = pooled_from
        self.micro_conditioning = micro_conditioning
        self.zero_uncond = zero_uncond
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
    def pooled_size(self) -> int:
        """Width P of ``text_embeds`` (0 without a pooled embedding)."""
        return 0 if self.pooled_from is None else self.encoders[self.pooled_from].pooled_size

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
        outputs = [
            e.outputs(ids.to(e.device), deduplicate=deduplicate)
            for e, ids in zip(self.encoders, token_ids, strict=True)
        ]
        contexts = [context for context, _ in outputs]
        cond = {CONTEXT: contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=-1)}  # (B, L, D)
        if self.pooled_from is not None:
            cond[POOLED] = outputs[self.pooled_from][1]  # (B, P)
        return cond

    def encode(self, captions: list[str]) -> Conditioning:
        return self(self.tokenize(captions))

    def unconditional(self, n: int) -> Conditioning:
        """What condition dropout trains and guidance subtracts: the empty caption's condition, or
        zeros of the same shapes (``zero_uncond``)."""
        cond = self.encode([NULL_CAPTION] * n)
        return {k: torch.zeros_like(v) for k, v in cond.items()} if self.zero_uncond else cond

    def with_micro(
        self, cond: Conditioning, original_size: Tensor, crop_top_left: Tensor, target_size: Tensor
    ) -> Conditioning:
        """``cond`` with ``time_ids`` (with micro-conditioning; else ``cond`` as it is)."""
        if not self.micro_conditioning:
            return cond
        ids = time_ids(original_size, crop_top_left, target_size)
        ids = ids.expand(len(cond[CONTEXT]), -1) if len(ids) == 1 else ids
        return {**cond, TIME_IDS: ids.to(cond[CONTEXT].device)}  # float32: sizes exact (the UNet embeds them)

    def batch_conditions(
        self,
        conditions: Callable[[list[str]], Conditioning],
        batch: dict,
        target_size: tuple[int, int],
        uniform: Tensor | None = None,
        p_uncond: Tensor | None = None,
    ) -> Conditioning:
        """A training batch's conditioning: condition dropout (caption -> "", and with ``zero_uncond``
        the rows zeroed), ``conditions`` (from ``training_conditions``), then the micro-conditioning
        from the batch's ``original_size`` and ``crop_top_left`` (default: the target size, (0, 0)).
        ``p_uncond`` (B,): each caption's own dropout probability (a concept dataset's sources), with
        ``uniform`` (B,) the draws; else ``self.p_uncond`` for all."""
        captions = list(batch["caption"])
        if p_uncond is not None:
            dropped = uniform < p_uncond.to(uniform)  # (B,)
        else:
            dropped = uncond_mask(len(captions), self.p_uncond, uniform=uniform)  # (B,)
        kept = [NULL_CAPTION if d else c for c, d in zip(captions, dropped.tolist(), strict=True)]
        cond = conditions(kept)
        if self.zero_uncond and bool(dropped.any()):
            keep = (~dropped).to(cond[CONTEXT].device)
            cond = {k: v * keep.view(-1, *[1] * (v.ndim - 1)).to(v.dtype) for k, v in cond.items()}
        target = torch.tensor(target_size)
        original = batch.get(MICRO_KEYS[0], target)
        crop = batch.get(MICRO_KEYS[1], torch.zeros(2, dtype=torch.long))
        return self.with_micro(cond, original, crop, target)

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


def unreached_parameters(encoder: TextEncoder) -> list[nn.Parameter]:
    """The parameters after ``encoder.hidden_layer`` (the last layers and ``final_layer_norm``), which
    its context never reaches: SDXL's first encoder, whose pooled output is unused, trains without them."""
    if encoder.hidden_layer is None:
        return []
    body = getattr(encoder.model, "text_model", encoder.model)  # transformers < 5 nests under .text_model
    layers = list(body.encoder.layers)
    unused = layers[len(layers) + encoder.hidden_layer + 1 :]  # hidden_states[k]: the output of layer n + k
    return [p for m in [*unused, body.final_layer_norm] for p in m.parameters()]


def sdxl_conditioner(
    first: TextEncoder,
    second: TextEncoder,
    p_uncond: float = 0.0,
    zero_uncond: bool = True,
    freeze_unreached: bool = False,
) -> Conditioner:
    """SDXL's conditioner: both encoders' ``hidden_states[-2]`` concatenated, the second's pooled
    projection as ``text_embeds``, ``time_ids``, and (``force_zeros_for_empty_prompt``) zeros as the
    unconditional input. ``freeze_unreached`` (training): the first encoder's parameters past
    ``hidden_states[-2]`` stop requiring gradients (``unreached_parameters``)."""
    for encoder in (first, second):
        encoder.hidden_layer = -2
    if freeze_unreached:  # training: no gradient reaches them, and DDP must not wait for one
        for p in unreached_parameters(first):
            p.requires_grad_(False)
    if not hasattr(second.model, "text_projection"):
        raise ValueError(
            "SDXL's second text encoder must be a CLIPTextModelWithProjection (its pooled embedding)"
        )
    return Conditioner(
        [first, second], p_uncond, pooled_from=1, micro_conditioning=True, zero_uncond=zero_uncond
    )
