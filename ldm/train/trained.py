"""What trains in stage 2, as one module: the UNet and, when it learns, the conditioner.

FSDP2 and DeepSpeed take one model per ``accelerator.prepare`` (accelerate: "Only one model is
supported when using FSDP2"); DDP then keeps one gradient reducer for all trained weights. The
forward is the training step's denoiser call,

    prediction = UNet(z_t, t, **conditions())       (epsilon, v or the flow velocity)

where ``conditions`` runs the conditioner inside the forward, so that its weights are in the one
module's graph: all-reduced, sharded or partitioned together with the UNet's.
"""

from __future__ import annotations

from collections.abc import Callable

from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from conditioning import Conditioner


class TrainedModules(nn.Module):
    def __init__(self, unet: UNet2DConditionModel, conditioner: Conditioner | None = None):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner  # None when frozen: it is not trained, so not in the module
        self._loss_unet = [unet]  # what the forward calls (a list: a compiled wrapper is no submodule)

    def use_for_loss(self, module: nn.Module) -> None:
        """Call ``module`` (``torch.compile`` of the UNet, sharing its weights) in the forward."""
        self._loss_unet = [module]

    def forward(self, z_t: Tensor, t: Tensor, conditions: Callable[[], dict]) -> Tensor:
        return self._loss_unet[0](z_t, t, **conditions()).sample
