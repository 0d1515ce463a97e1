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
from collections.abc import Iterator
from contextlib import contextmanager

import torch

HOST_SEED_OFFSET = 1  # the host stream's seed is seed + 1: another stream than the device's


def _encode(generator: torch.Generator) -> str:
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def _decode(generator: torch.Generator, text: str) -> None:
    generator.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone())


class StepRandom:
    """``randn`` / ``randint`` for this process's rows of the global batch, on the device;
    ``rand_host`` for decisions made on the host (which captions to drop), so that no draw has to
    travel from the device to the host inside the step."""

    def __init__(self, seed: int, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.host_generator = torch.Generator().manual_seed(seed + HOST_SEED_OFFSET)

    def state_dict(self) -> dict[str, str]:
        """Both generators' states, JSON-ready (the same on every process)."""
        return {"generator": _encode(self.generator), "host_generator": _encode(self.host_generator)}

    def load_state_dict(self, state: dict[str, str]) -> None:
        _decode(self.generator, state["generator"])
        _decode(self.host_generator, state["host_generator"])

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.rank :: self.world_size]

    def randn(self, *local_shape: int) -> torch.Tensor:
        """N(0, 1) of shape ``local_shape`` = (local batch, ...): this process's rows of the global draw."""
        b, *rest = local_shape
        full = torch.randn(b * self.world_size, *rest, generator=self.generator, device=self.device)
        return self._rows(full)

    def rand_host(self, batch: int) -> torch.Tensor:
        """U[0, 1) of shape (local batch,), on the CPU."""
        return self._rows(torch.rand(batch * self.world_size, generator=self.host_generator))

    def rand_host_rows(self, batch: int, width: int) -> torch.Tensor:
        """U[0, 1) of shape (local batch, width), on the CPU (a row of draws per item)."""
        return self._rows(torch.rand(batch * self.world_size, width, generator=self.host_generator))

    def randint(self, high: int, batch: int) -> torch.Tensor:
        """Integers in [0, high) of shape (local batch,)."""
        full = torch.randint(
            0, high, (batch * self.world_size,), generator=self.generator, device=self.device
        )
        return self._rows(full)

    def rand(self, batch: int) -> torch.Tensor:
        """U[0, 1) of shape (local batch,), on the device."""
        return self._rows(torch.rand(batch * self.world_size, generator=self.generator, device=self.device))


@contextmanager
def seeded_on_every_process(seed: int) -> Iterator[None]:
    """Inside, the host's torch generator seeded with ``seed`` alone (the processes are seeded with
    seed + rank otherwise), and restored after: networks built inside start equal on every process,
    whatever the engine (DDP would broadcast what it wraps; FSDP, and anything frozen, would not)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
