"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, kind: str, min_ratio: float = 0.0) -> float:
    """Factor on the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from 0 over ``warmup_steps``, then ``constant``, ``linear`` decay or
    ``cosine`` decay (Loshchilov & Hutter 2017, SGDR: ``0.5 * (1 + cos(pi * progress))``)
    down to ``min_ratio`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        decay = 1.0 - progress
    elif kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {kind!r}; allowed: constant | cosine | linear")
    return min_ratio + (1.0 - min_ratio) * decay
