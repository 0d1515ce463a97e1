"""Samplers by name: each is a diffusers scheduler class, the settings that make it that sampler, and
the objective (``ldm.diffusion.registry``) whose models it samples.

The registry doubles as the list of valid names in errors and on the command line.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.core.errors import ConfigError
from ldm.diffusion.registry import FLOW_SCHEDULERS


class Sampler(NamedTuple):
    scheduler: type[SchedulerMixin]
    settings: dict[str, Any]
    objective: str = "ddpm"


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(DDPMScheduler, {}),
    "ddim": Sampler(DDIMScheduler, {}),
    "pndm": Sampler(PNDMScheduler, {"skip_prk_steps": True}),
    "dpm++2m": Sampler(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": Sampler(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    # DPM-Solver++(2M) SDE (Lu et al. 2022): the stochastic variant, without torchsde
    "dpm++sde": Sampler(
        DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
    ),
    "euler": Sampler(EulerDiscreteScheduler, {}),
    "euler-a": Sampler(EulerAncestralDiscreteScheduler, {}),
    "heun": Sampler(HeunDiscreteScheduler, {}),
    "lms": Sampler(LMSDiscreteScheduler, {}),
    "unipc": Sampler(UniPCMultistepScheduler, {}),
    # rectified-flow models: Euler and Heun steps along the learned velocity, and the multistep
    # solvers on z_0 = z_t - t v (diffusers' flow sigmas, as SANA samples)
    "flow-euler": Sampler(FlowMatchEulerDiscreteScheduler, {}, "rectified_flow"),
    "flow-heun": Sampler(FlowMatchHeunDiscreteScheduler, {}, "rectified_flow"),
    "flow-dpm++2m": Sampler(
        DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, "rectified_flow"
    ),
    "flow-unipc": Sampler(UniPCMultistepScheduler, {}, "rectified_flow"),
}


# the command lines' samplers when none is named, per objective
CLI_DEFAULTS = {"ddpm": "dpm++2m", "rectified_flow": "flow-euler"}


def cli_sampler(name: str | None, objective: str) -> str:
    """``--sampler`` or the command lines' default for the model's objective, checked."""
    name = name or CLI_DEFAULTS[objective]
    check_sampler(name, objective, "--sampler")
    return name


def samplers_for(objective: str) -> list[str]:
    """The names of the samplers for models trained with ``objective``."""
    return [name for name, sampler in SAMPLERS.items() if sampler.objective == objective]


def check_sampler(name: str, objective: str, key: str = "sampler") -> None:
    """A ``ConfigError`` (a ``ValueError``, and a ``UserError`` the command lines report in one line)
    naming the allowed samplers unless ``name`` samples ``objective`` models."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown {key} {name!r}; choose one of: {', '.join(samplers_for(objective))}")
    if SAMPLERS[name].objective != objective:
        raise ConfigError(
            f"{key} {name!r} samples {SAMPLERS[name].objective} models; this one is a {objective} model: "
            f"choose one of: {', '.join(samplers_for(objective))}"
        )


# settings of one sampler that must not leak into another built from its config
_SAMPLER_KEYS = {"algorithm_type", "solver_order", "use_karras_sigmas", "skip_prk_steps"}


def make_scheduler(name: str, config: dict[str, Any], objective: str = "ddpm") -> SchedulerMixin:
    """The sampler ``name`` on the noise schedule of ``config`` (a diffusers scheduler config of a model
    trained with ``objective``).

    ``clip_sample`` is always off: latents are not confined to [-1, 1].
    """
    check_sampler(name, objective)
    cls, settings, _ = SAMPLERS[name]
    if objective == "rectified_flow" and cls.__name__ not in FLOW_SCHEDULERS:  # a DDPM solver on flow sigmas
        return cls(
            num_train_timesteps=config.get("num_train_timesteps", 1000), use_flow_sigmas=True,
            prediction_type="flow_prediction", flow_shift=config.get("shift", 1.0), **settings,
        )  # fmt: skip
    accepted = inspect.signature(cls.__init__).parameters  # another scheduler's keys would only warn
    base = {k: v for k, v in dict(config).items() if k in accepted and k not in _SAMPLER_KEYS}
    if "clip_sample" in accepted:
        base["clip_sample"] = False
    return cls.from_config(base, **settings)
