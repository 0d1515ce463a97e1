"""What trains in stage 2, as one module: the UNet and, when it learns, the conditioner.

FSDP2 and DeepSpeed take one model per ``accelerator.prepare`` (accelerate: "Only one model is
supported when using FSDP2"); DDP then keeps one gradient reducer for all trained weights. The
forward is the training step's denoiser call,

    prediction = UNet(z_t, t, **conditions())       (epsilon, v or the flow velocity)

where ``conditions`` runs the conditioner inside the forward, so that its weights are in the one
module's graph: all-reduced, sharded or partitioned together with the UNet's. A frozen conditioner's
keyword arguments can come as tensors instead (``**unet_kwargs``): then ``torch.compile`` can take the
whole DDP module, whose gradient all-reduces overlap the backward (DDPOptimizer), where a compiled UNet
inside it would hand DDP every gradient at the end of the backward at once.

The inputs are cast to the UNet's dtype: DeepSpeed's bf16 and fp16 keep the module's weights in the
half dtype and run it without autocast. The prediction comes back in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from conditioning import Conditioner
from conditioning.conditioner import TIME_IDS


class TrainedModules(nn.Module):
    def __init__(self, unet: UNet2DConditionModel, conditioner: Conditioner | None = None):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner  # None when frozen: it is not trained, so not in the module
        self._loss_unet = [unet]  # what the forward calls (a list: a compiled wrapper is no submodule)

    def use_for_loss(self, module: nn.Module) -> None:
        """Call ``module`` (``torch.compile`` of the UNet, sharing its weights) in the forward."""
        self._loss_unet = [module]

    def forward(
        self, z_t: Tensor, t: Tensor, conditions: Callable[[], dict] | None = None, **unet_kwargs
    ) -> Tensor:
        kwargs = conditions() if conditions is not None else unet_kwargs
        dtype = self.unet.dtype
        if dtype != z_t.dtype:  # DeepSpeed's half weights (under autocast, the weights stay float32)
            z_t, kwargs = z_t.to(dtype), to_dtype(kwargs, dtype)
        return self._loss_unet[0](z_t, t, **kwargs).sample.float()


def to_dtype(value, dtype: torch.dtype):
    """Floating tensors in ``value`` (nested dicts) cast to ``dtype``; others, and SDXL's ``time_ids``
    (sizes, exact in float32; the UNet casts their embedding), as they are."""
    if isinstance(value, dict):
        return {k: v if k == TIME_IDS else to_dtype(v, dtype) for k, v in value.items()}
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value
