"""Steps with a NaN or Inf loss are skipped and counted; too many in a row stop the run.

The check stays on the device: a fused optimizer takes a ``found_inf`` flag (as ``GradScaler``
uses) and skips its whole update when it is 1, so no step waits for the host. Counts are read
when the loop logs. Optimizers without that support fall back to a host check.
"""

from __future__ import annotations

import logging

import torch

from ldm.core.errors import UserError

logger = logging.getLogger("ldm")


class NonFiniteLossError(UserError, RuntimeError):
    """Too many NaN/Inf-loss steps in a row; the message says which settings to change."""


class NonFiniteGuard:
    """``step(optimizer, loss)`` in place of ``optimizer.step()``; ``check()`` at logging time."""

    def __init__(self, max_consecutive: int, device: torch.device, agree=None) -> None:
        """``agree``: a bool tensor -> whether it is true on any process (several processes: all of them
        skip a step together, else the replicas' weights part)."""
        self.max_consecutive = max_consecutive
        self.agree = agree
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # since the last check
        self.consecutive = torch.zeros((), dtype=torch.long, device=device)
        self.pending = torch.zeros(
            (), dtype=torch.bool, device=device
        )  # a bad micro-batch since the last update
        self.total = 0

    def step(self, optimizer, loss: torch.Tensor, scaler=None, sync: bool = True) -> None:
        """Take the optimizer step unless a loss since the last update is not finite (then the
        accumulated gradients are ignored). ``sync``: whether this micro-step updates the weights."""
        self.pending |= ~torch.isfinite(loss.detach()).all()
        if not sync:
            optimizer.step()  # accelerate's wrapper does nothing until gradients are synchronised
            return
        bad, self.pending = self.pending, torch.zeros_like(self.pending)
        if self.agree is not None:
            bad = self.agree(bad)
        self.skipped += bad
        self.consecutive = (self.consecutive + 1) * bad
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        if scaler is not None:  # fp16: GradScaler already skips steps whose gradients overflow
            optimizer.step()
        elif getattr(inner, "_step_supports_amp_scaling", False):
            inner.found_inf = bad.float()
            try:
                optimizer.step()
            finally:
                del inner.found_inf
        elif not bool(bad):
            optimizer.step()

    def check(self) -> int:
        """Steps skipped since the last check (a host read); raises after ``max_consecutive`` in a row."""
        skipped = int(self.skipped.item())
        self.skipped.zero_()
        self.total += skipped
        if skipped:
            logger.warning("skipped %d step(s) with a NaN or Inf loss (%d in this run)", skipped, self.total)
        if int(self.consecutive.item()) >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{int(self.consecutive.item())} consecutive steps had a NaN or Inf loss; stopping without saving. "
                "Lower train.lr, set train.grad_clip, or resume from the last checkpoint (--resume latest)"
            )
        return skipped
