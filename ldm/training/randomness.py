"""Random draws of a training step that do not depend on how many processes share the batch.

Each process's data sampler gives it the rows rank, rank + N, rank + 2N, ... of the global batch
(``ResumableSampler``). If every process drew its own noise from its own RNG, N processes would
train differently from one process with the same global batch. Here every process draws the
numbers for the whole global batch from one generator, seeded alike everywhere and advanced in
lockstep, and keeps its own rows. So a run on N processes equals a run on 1 process with the
same global batch (up to float summation order).

It is one stream, like torch's global RNG (the CPU generator is a Mersenne Twister, not made to
be reseeded from nearby seeds every step), and its state goes into each checkpoint
(``state_dict``), so a resumed run draws what the uninterrupted run drew. The cost is drawing N
times as many numbers: small next to a UNet step, and on the device's own generator on GPUs.
"""

from __future__ import annotations

import base64

import torch


class StepRandom:
    """``randn`` / ``rand`` / ``randint`` for this process's rows of the global batch."""

    def __init__(self, seed: int, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def state_dict(self) -> dict[str, str]:
        """The generator's state, JSON-ready (the same on every process)."""
        return {"generator": base64.b64encode(self.generator.get_state().numpy().tobytes()).decode()}

    def load_state_dict(self, state: dict[str, str]) -> None:
        raw = bytearray(base64.b64decode(state["generator"]))
        self.generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())

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
