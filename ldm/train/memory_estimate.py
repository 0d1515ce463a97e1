"""``train_ldm.py --dry-run``'s memory estimate: weights, gradients, optimizer state, activations per image.

Everything is counted on the meta device (shapes and dtypes only, no memory, seconds even for SDXL):

- weights: every parameter in the dtype the run keeps it in (trained ones in float32; frozen ones in
  the mixed-precision dtype, see ``ldm.train.setup.cast_frozen``; the autoencoder in float32);
- gradients: 4 bytes per trained parameter;
- optimizer state: AdamW 8 bytes per trained parameter, 8-bit AdamW 2, Adafactor (n + m) * 4 per
  (n x m) matrix and 4 per vector element;
- activations per image: the bytes autograd saves for backward in one UNet forward on one image at
  ``data.resolution`` (``torch.autograd.graph.saved_tensors_hooks``), in the compute dtype, with
  gradient checkpointing as configured. A tensor saved by two operations counts twice, so this is
  an upper estimate; attention is counted as memory-efficient kernels store it (flash / xformers:
  O(tokens), not the tokens x tokens matrix), which is what CUDA runs use.

Not counted: the CUDA context and allocator slack (typically 0.5 to 1.5 GiB), the text encoders'
activations (they run once per distinct caption when frozen), and the latent and caption caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GIB = 2**30
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MemoryEstimate:
    weights: int  # bytes
    gradients: int
    optimizer: int
    activations_per_image: int
    batch_size: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations_per_image * self.batch_size

    def lines(self) -> list[str]:
        b = self.batch_size
        return [
            "# memory estimate (per process; see ldm/train/memory_estimate.py for what is counted)",
            f"#   weights:            {self.weights / GIB:7.2f} GiB",
            f"#   gradients:          {self.gradients / GIB:7.2f} GiB",
            f"#   optimizer state:    {self.optimizer / GIB:7.2f} GiB",
            f"#   activations:        {self.activations_per_image / GIB:7.2f} GiB per image x {b}",
            f"#   total:              {self.total / GIB:7.2f} GiB (+ CUDA context and allocator slack)",
        ]


def optimizer_state_bytes(name: str, params: list[nn.Parameter]) -> int:
    if name == "adamw":
        return 8 * sum(p.numel() for p in params)
    if name == "adamw8bit":
        return 2 * sum(p.numel() for p in params)
    # adafactor: a row and a column vector per matrix (factored second moment), full for vectors
    return 4 * sum(p.shape[0] + p[0].numel() if p.ndim >= 2 else p.numel() for p in params)


def saved_activation_bytes(forward) -> int:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


def unet_activation_bytes(unet: nn.Module, latent: tuple[int, int, int], context: tuple[int, int],
                          added: dict[str, int], dtype: torch.dtype) -> int:  # fmt: skip
    """Saved-for-backward bytes of one image through ``unet`` (on the meta device)."""
    z = torch.empty(1, *latent, device="meta", dtype=dtype)  # the parameters need grad, not the input
    kwargs: dict = {"encoder_hidden_states": torch.empty(1, *context, device="meta", dtype=dtype)}
    if added:
        kwargs["added_cond_kwargs"] = {
            k: torch.empty(1, n, device="meta", dtype=dtype) for k, n in added.items()
        }
    t = torch.zeros(1, device="meta", dtype=torch.long)
    unet.train()
    return saved_activation_bytes(lambda: unet(z, t, **kwargs))


def estimate(
    modules: dict[str, nn.Module],
    trainable: list[nn.Parameter],
    frozen_dtype: torch.dtype,
    optimizer: str,
    activations_per_image: int,
    batch_size: int,
) -> MemoryEstimate:
    """``modules``: name -> module (on meta); ``trainable``: the parameters that train (float32)."""
    trained = {id(p) for p in trainable}
    weights = 0
    for name, module in modules.items():
        dtype_bytes = 4 if name == "autoencoder" else torch.empty((), dtype=frozen_dtype).element_size()
        for p in module.parameters():
            weights += p.numel() * (4 if id(p) in trained else dtype_bytes)
    grads = 4 * sum(p.numel() for p in trainable)
    return MemoryEstimate(
        weights, grads, optimizer_state_bytes(optimizer, trainable), activations_per_image, batch_size
    )
