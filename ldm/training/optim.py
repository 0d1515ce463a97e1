"""Optimizers: the fused (single-kernel) implementation where the device supports it."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from ldm.training.engine import full_tensor

logger = logging.getLogger("ldm")


def adamw(
    params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019), fused when possible: one kernel for all parameters
    instead of a few per tensor (measured 45 -> 11 ms a step for the shapes UNet on a CPU)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter] | list[dict],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
) -> torch.optim.Optimizer:
    """``train.optimizer``: adamw (above); adafactor (Shazeer & Stern 2018: the second moment of an
    (n x m) weight as a row and a column vector, n + m numbers instead of n m, and no first moment;
    transformers' implementation at a fixed ``lr``); adamw8bit (bitsandbytes' AdamW with 8-bit
    block-quantized states, Dettmers et al. 2022: 2 bytes a parameter instead of 8; CUDA only)."""
    params = list(params)
    if name == "adamw":
        return adamw(params, lr, betas, weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=lr,
            weight_decay=weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    if name == "adamw8bit":
        from ldm.core.errors import ConfigError

        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError(
                "train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); "
                "or use train.optimizer=adafactor"
            ) from err
        first = (
            params[0]["params"][0]
            if params and isinstance(params[0], dict)
            else params[0]
            if params
            else None
        )
        if first is None or first.device.type != "cuda":
            raise ConfigError("train.optimizer=adamw8bit runs on CUDA only; use adamw or adafactor here")
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "prodigy":
        prodigy = _optional("prodigyopt", "prodigy", "train.optimizer=prodigy")
        if lr < 0.1:
            logger.warning(
                "train.optimizer=prodigy estimates the step size itself; train.lr=%g multiplies it "
                "(Prodigy's authors use 1.0)", lr,
            )  # fmt: skip
        return prodigy.Prodigy(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "schedulefree":
        schedulefree = _optional("schedulefree", "schedulefree", "train.optimizer=schedulefree")
        return schedulefree.AdamWScheduleFree(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(
        f"unknown optimizer {name!r}; allowed: adamw | adafactor | adamw8bit | prodigy | schedulefree"
    )


def _optional(module: str, extra: str, what: str):
    """The optional package ``module``, or a ``ConfigError`` naming the extra that installs it."""
    import importlib

    from ldm.core.errors import ConfigError

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f'{what} needs {module}: pip install -e ".[{extra}]" (or pip install {module})'
        ) from err


def set_optimizer_mode(optimizers, train: bool) -> None:
    """Schedule-free optimizers (Defazio et al. 2024) hold the weights being stepped (y) in train mode
    and their average (x, the weights to sample and export) in eval mode: ``train()`` / ``eval()``
    switch them (accelerate's wrapper forwards); other optimizers have no modes."""
    for optimizer in optimizers:
        switch = getattr(optimizer, "train" if train else "eval", None)
        if callable(switch):
            switch()


@contextmanager
def averaged_weights(optimizers) -> Iterator[None]:
    """Inside, a schedule-free optimizer's averaged weights (eval mode); train mode after, with the
    stepped weights restored exactly (the eval/train interpolations round them otherwise)."""
    free = [o for o in optimizers if o.param_groups and "train_mode" in o.param_groups[0]]
    stepped = [(p, p.detach().clone()) for o in free for g in o.param_groups for p in g["params"]]
    set_optimizer_mode(optimizers, train=False)
    try:
        yield
    finally:
        set_optimizer_mode(optimizers, train=True)
        with torch.no_grad():
            for p, saved in stepped:
                p.copy_(saved)


# per parameter: adafactor ~0; prodigy: two moments, its s and the initial weights; schedulefree: z and
# the second moment
OPTIMIZER_STATE_BYTES = {
    "adamw": 8.0,
    "adafactor": 0.0,
    "adamw8bit": 2.0,
    "prodigy": 16.0,
    "schedulefree": 8.0,
}


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (g <- g * min(1, max_norm / ||g||)); returns ||g||.

    On accelerators this is accelerate's ``clip_grad_norm_``, which always rescales so that the host
    never waits for the norm. On a single CPU process reading the norm is free, so the rescale pass
    is skipped when ||g|| <= max_norm (the usual case once training settles).
    """
    from accelerate.utils import DistributedType

    if accelerator.device.type != "cpu" or accelerator.distributed_type != DistributedType.NO:
        norm = accelerator.clip_grad_norm_(params, max_norm)  # DeepSpeed clips in its step: its norm
        if norm is None or isinstance(norm, float):  # DeepSpeed: a float (None before its first step)
            return torch.tensor(float("nan") if norm is None else norm)
        return full_tensor(norm)  # FSDP: a replicated DTensor
    accelerator.unscale_gradients()
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
