"""Samplers by name: each is a diffusers scheduler class plus the settings that make it that sampler.

The registry doubles as the list of valid names in errors and on the command line.
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    # DPM-Solver++(2M) SDE (Lu et al. 2022): the stochastic variant, without torchsde
    "dpm++sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}

# settings of one sampler that must not leak into another built from its config
_SAMPLER_KEYS = {"algorithm_type", "solver_order", "use_karras_sigmas", "skip_prk_steps"}


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """The sampler ``name`` on the noise schedule of ``config`` (any diffusers scheduler config).

    ``clip_sample`` is always off: latents are not confined to [-1, 1].
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    cls, settings = SAMPLERS[name]
    base = {k: v for k, v in dict(config).items() if k not in _SAMPLER_KEYS and not k.startswith("_")}
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        base["clip_sample"] = False
    return cls.from_config(base, **settings)
