"""Random draws of a training step that do not depend on how many processes share the batch.

Each process's data sampler gives it the rows rank, rank + N, rank + 2N, ... of the global batch
(``ResumableSampler``). If every process drew its own noise from its own RNG, N processes would
train differently from one process with the same global batch. Here every process draws the
numbers for the whole global batch from one generator, seeded alike everywhere from
(seed, step, micro-step), and keeps its own rows. So:

- a run on N processes equals a run on 1 process with the same global batch (up to float
  summation order), and both ranks of a run draw consistent numbers;
- a resumed run draws what the uninterrupted run drew, with no RNG state to save.

The cost is drawing N times as many numbers (small next to a UNet step; on the device's own
generator on GPUs).
"""

from __future__ import annotations

import torch

SEED_MIX = 1_000_003  # mixes (seed, step, micro-step) into one generator seed


class StepRandom:
    """``randn`` / ``rand`` / ``randint`` for this process's rows of the global batch at one step."""

    def __init__(self, seed: int, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.reseed(0)

    def reseed(self, step: int, micro_step: int = 0) -> None:
        """Start the draws of ``step`` (and its gradient-accumulation ``micro_step``)."""
        mixed = ((self.seed * SEED_MIX + step) * SEED_MIX + micro_step) % (2**63 - 1)
        self.generator.manual_seed(mixed)

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.rank :: self.world_size]

    def randn(self, *local_shape: int) -> torch.Tensor:
        """N(0, 1) of shape ``local_shape`` = (local batch, ...): this process's rows of the global draw."""
        b, *rest = local_shape
        full = torch.randn(b * self.world_size, *rest, generator=self.generator, device=self.device)
        return self._rows(full)

    def rand(self, batch: int) -> torch.Tensor:
        """U[0, 1) of shape (local batch,)."""
        return self._rows(torch.rand(batch * self.world_size, generator=self.generator, device=self.device))

    def randint(self, high: int, batch: int) -> torch.Tensor:
        """Integers in [0, high) of shape (local batch,)."""
        full = torch.randint(
            0, high, (batch * self.world_size,), generator=self.generator, device=self.device
        )
        return self._rows(full)
