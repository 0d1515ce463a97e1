"""``train_ldm.py --dry-run``'s memory estimate: weights, gradients, optimizer state, activations per image.

Everything is counted on the meta device (shapes and dtypes only, no memory, seconds even for SDXL):

- weights: every parameter in the dtype the run keeps it in (trained ones in float32; frozen ones in
  the mixed-precision dtype, see ``ldm.train.setup.cast_frozen``; the autoencoder in float32);
- gradients: 4 bytes per trained parameter;
- optimizer state: AdamW 8 bytes per trained parameter, 8-bit AdamW 2 (bitsandbytes keeps small
  tensors' state in 32 bits: a little more), Adafactor its factored second moment (transformers'
  shapes); an EMA (``train.ema_decay`` > 0) adds a float32 copy of the trained parameters;
- activations per image: the bytes autograd saves for backward in one UNet forward on one image at
  ``data.resolution`` (``torch.autograd.graph.saved_tensors_hooks``), in the compute dtype, with
  gradient checkpointing as configured (then: what the checkpointed forward keeps, plus the largest
  checkpointed unit's activations, recomputed during backward). Attention is counted as
  memory-efficient kernels store it (flash / xformers: O(tokens), not the tokens x tokens matrix),
  which is what CUDA runs use. An estimate, not a bound either way: a tensor saved by two operations
  counts twice (over), and the forward runs wholly in the half dtype, where autocast would keep
  the norms' outputs in float32 (under).

Not counted: the CUDA context and allocator slack (typically 0.5 to 1.5 GiB), the text encoders'
activations (they run once per distinct caption when frozen), and the latent and caption caches.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.training.optim import OPTIMIZER_STATE_BYTES

GIB = 2**30
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MemoryEstimate:
    weights: int  # bytes
    gradients: int
    optimizer: int
    activations_per_image: int
    batch_size: int
    trained_parameters: int = 0
    ema: int = 0  # bytes of the EMA's float32 copy

    @property
    def total(self) -> int:
        per_batch = self.activations_per_image * self.batch_size
        return self.weights + self.gradients + self.optimizer + self.ema + per_batch

    def lines(self) -> list[str]:
        b = self.batch_size
        return [
            "# memory estimate (per process; see ldm/train/memory_estimate.py for what is counted)",
            f"#   trained parameters: {self.trained_parameters / 1e6:.3f}M",
            f"#   weights:            {self.weights / GIB:7.2f} GiB",
            f"#   gradients:          {self.gradients / GIB:7.2f} GiB",
            f"#   optimizer state:    {self.optimizer / GIB:7.2f} GiB",
            f"#   EMA weights:        {self.ema / GIB:7.2f} GiB",
            f"#   activations:        {self.activations_per_image / GIB:7.2f} GiB per image x {b}",
            f"#   total:              {self.total / GIB:7.2f} GiB (+ CUDA context and allocator slack)",
        ]


def optimizer_state_bytes(name: str, params: list[nn.Parameter]) -> int:
    if name == "adamw":
        return 8 * sum(p.numel() for p in params)
    if name == "adamw8bit":
        return 2 * sum(p.numel() for p in params)
    if name in ("prodigy", "schedulefree"):
        return int(OPTIMIZER_STATE_BYTES[name]) * sum(p.numel() for p in params)
    # adafactor (transformers'): for 2+ dims, the second moment factored over the last two dims,
    # shape[:-1] and shape[:-2] + shape[-1:] (a conv weight (o, i, k, k): o i k + o i k); full for vectors
    return 4 * sum(
        math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1] if p.ndim >= 2 else p.numel()
        for p in params
    )


class _FlashAttention(torch.autograd.Function):
    """What a memory-efficient attention kernel (flash, xformers) keeps for backward: q, k, v, the
    output and the log-sum-exp per query, O(tokens); the meta device's SDPA would count the
    tokens x tokens matrix of the math fallback instead."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)  # (B, H, N)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the estimate only does forwards
        raise NotImplementedError


def _flash_sdpa(query, key, value, *args, **kwargs):
    return _FlashAttention.apply(query, key, value)


@contextmanager
def memory_efficient_attention():
    """``F.scaled_dot_product_attention`` counted as a memory-efficient kernel stores it (meta only)."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_activation_bytes(forward) -> int:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), memory_efficient_attention():
        forward()
    return total


CHECKPOINT_UNITS = ("ResnetBlock2D", "BasicTransformerBlock")  # what diffusers' UNet checkpoints one by one


def unet_activation_bytes(unet: nn.Module, latent: tuple[int, int, int], context: tuple[int, int],
                          added: dict[str, int], dtype: torch.dtype) -> int:  # fmt: skip
    """Saved-for-backward bytes of one image through ``unet`` (on the meta device). With gradient
    checkpointing: what the checkpointed forward keeps, plus the largest unit's own activations,
    which its recomputation holds during backward."""
    z = torch.empty(1, *latent, device="meta", dtype=dtype)  # the parameters need grad, not the input
    kwargs: dict = {"encoder_hidden_states": torch.empty(1, *context, device="meta", dtype=dtype)}
    if added:
        kwargs["added_cond_kwargs"] = {
            k: torch.empty(1, n, device="meta", dtype=dtype) for k, n in added.items()
        }
    t = torch.zeros(1, device="meta", dtype=torch.long)
    unet.train()

    def run():
        return unet(z, t, **kwargs)

    if not getattr(unet, "is_gradient_checkpointing", False):
        return saved_activation_bytes(run)
    kept = saved_activation_bytes(run)
    unet.disable_gradient_checkpointing()
    try:
        return kept + max(_unit_bytes(unet, run), default=0)
    finally:
        unet.enable_gradient_checkpointing()


def _unit_bytes(unet: nn.Module, run) -> list[int]:
    """Saved bytes inside each checkpointed unit, in one forward without checkpointing."""
    counts: list[int] = []
    total = [0]
    starts: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    def start(module, args) -> None:
        starts[id(module)] = total[0]

    def end(module, args, output) -> None:
        counts.append(total[0] - starts[id(module)])

    handles = []
    for module in unet.modules():
        if type(module).__name__ in CHECKPOINT_UNITS:
            handles += [module.register_forward_pre_hook(start), module.register_forward_hook(end)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), memory_efficient_attention():
            run()
    finally:
        for h in handles:
            h.remove()
    return counts


def estimate(
    modules: dict[str, nn.Module],
    trainable: list[nn.Parameter],
    frozen_dtype: torch.dtype,
    optimizer: str,
    activations_per_image: int,
    batch_size: int,
    ema: bool = False,
) -> MemoryEstimate:
    """``modules``: name -> module (on meta); ``trainable``: the parameters that train (float32)."""
    trained = {id(p) for p in trainable}
    weights = 0
    for name, module in modules.items():
        dtype_bytes = 4 if name == "autoencoder" else torch.empty((), dtype=frozen_dtype).element_size()
        for p in module.parameters():
            weights += p.numel() * (4 if id(p) in trained else dtype_bytes)
    grads = 4 * sum(p.numel() for p in trainable)
    state = optimizer_state_bytes(optimizer, trainable)
    trained_count = sum(p.numel() for p in trainable)
    return MemoryEstimate(
        weights,
        grads,
        state,
        activations_per_image,
        batch_size,
        trained_count,
        4 * trained_count if ema else 0,
    )
