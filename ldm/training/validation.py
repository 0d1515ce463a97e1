"""What a deterministic validation loss needs, for both stages.

Fixed items, fixed draws: each entry's noise comes from its own seeded generator, so the draws do not
depend on batching or on the process count. The work is cut into fixed chunks, chunk c runs on
process c mod P, and the chunks' results are summed over the processes into zeros (exact), so every
process holds the same tensor, equal to that of one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ldm.training.engine import is_dtensor

VALIDATION_SEED = 1_000_033  # the draws' seeds: this + the run's seed + the entry's index


def stratified_fractions(n: int, seed: int) -> Tensor:
    """u_j = (j + U_j) / n for j < n, shuffled: one fraction of the schedule in each of n equal
    strata (stratified sampling), in an order that mixes them over the items. (n,) float64."""
    g = torch.Generator().manual_seed(seed)
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
    return u[torch.randperm(n, generator=g)]


def entry_noise(shape: tuple[int, ...], seed: int, index: int) -> Tensor:
    """The fixed standard normal draw of entry ``index`` (on the CPU; the same on any process)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + index))


def chunks(n: int, size: int) -> list[range]:
    """[0, n) cut into consecutive ranges of ``size`` (the last one shorter)."""
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def over_processes(
    accelerator, count: int, width: int, compute: Callable[[int], Tensor], lockstep: bool = False
) -> Tensor:
    """(count, width) on every process: row c is ``compute(c)`` (a (width,) tensor), run by process
    c mod P; the rows are summed over the processes into zeros. ``lockstep`` (FSDP, where every
    forward is a collective that all processes must join): every process computes every row."""
    rows = torch.zeros(count, width, dtype=torch.float64, device=accelerator.device)
    if lockstep:
        for c in range(count):
            rows[c] = compute(c).to(rows)
        return rows
    for c in range(accelerator.process_index, count, accelerator.num_processes):
        rows[c] = compute(c).to(rows)
    if accelerator.num_processes > 1:
        rows = accelerator.reduce(rows, "sum")
    return rows


@contextmanager
def ema_weights(ema, params) -> Iterator[None]:
    """The EMA weights in ``params`` inside, the trained ones back after (no-op without EMA). The
    tensors are swapped, not copied: no host copy on every process (as ``EMAModel.store`` makes).
    FSDP shards are copied in place instead (FSDP gathers from its own storage, which a swap of
    ``.data`` would not reach), through one copy of this process's shard; so are half weights with
    float32 shadows (DeepSpeed's bf16), which a swap would turn float32."""
    if ema is None:
        yield
        return
    pairs = list(zip(params, ema.shadow_params, strict=True))
    if any(
        is_dtensor(p) or p.dtype != s.dtype for p, s in pairs
    ):  # shards, or float32 shadows of half weights
        with torch.no_grad():
            trained = [p.detach().clone() for p in params]
            for p, s in pairs:
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(params, trained, strict=True):
                    p.copy_(t)
        return

    def swap() -> None:
        for p, s in pairs:
            p.data, s.data = s.data, p.data

    swap()
    try:
        yield
    finally:
        swap()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """``modules`` in eval mode inside (no dropout), their modes restored after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
