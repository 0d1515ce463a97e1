"""EMA of the trained weights: diffusers' ``EMAModel`` with a one-pass update.

    s <- s + (1 - d) (p - s) = lerp(s, p, 1 - d),  d = min(decay, (1 + n) / (10 + n)) (diffusers' warm-up)

diffusers' foreach update computes p - s into new tensors and then subtracts them (two passes
and an allocation per parameter); ``torch._foreach_lerp_`` does it in one pass: 4.7 ms instead of
12.7 ms per step for the shapes model's 10.7M parameters on the CPU. Everything else (state,
checkpointing, ``store``/``restore``/``copy_to``) is diffusers'.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.training_utils import EMAModel


class EMA(EMAModel):
    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        parameters = list(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p) for s, p in zip(self.shadow_params, parameters, strict=True) if p.requires_grad]
        frozen = [(s, p) for s, p in zip(self.shadow_params, parameters, strict=True) if not p.requires_grad]
        if frozen:
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
        if trained:
            torch._foreach_lerp_([s for s, _ in trained], [p.detach() for _, p in trained], 1 - decay)


def ema_for(params: list[torch.nn.Parameter], decay: float, device: torch.device) -> EMA | None:
    """An EMA of ``params`` on ``device`` (``train.ema_decay`` > 0), else None."""
    if decay <= 0:
        return None
    ema = EMA(params, decay=decay)
    ema.to(device)  # in place (diffusers' EMAModel.to returns None)
    return ema
