"""The objectives by name: the registry is the list of kinds (``noise.objective``).

A new objective is one file with an ``Objective`` subclass and one line here.
"""

from __future__ import annotations

from typing import Any

from ldm.diffusion.config import NoiseConfig
from ldm.diffusion.ddpm import DDPM
from ldm.diffusion.flow import RectifiedFlow
from ldm.diffusion.objective import Objective

OBJECTIVES: dict[str, type[Objective]] = {
    DDPM.name: DDPM,
    RectifiedFlow.name: RectifiedFlow,
}
# the sampling scheduler classes an exported flow model names in its scheduler/ config
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def build_objective(cfg: NoiseConfig) -> Objective:
    return OBJECTIVES[cfg.objective].from_config(cfg)


def objective_for(scheduler_config: dict[str, Any]) -> Objective:
    """The objective a model was trained with, from its exported scheduler config: a flow-matching
    scheduler means rectified flow; any other (DDPM, DDIM, PNDM, Euler, ... as Stable Diffusion folders
    ship) the DDPM schedule it describes."""
    if scheduler_config.get("_class_name") in FLOW_SCHEDULERS:
        return RectifiedFlow.from_scheduler_config(scheduler_config)
    return DDPM.from_scheduler_config(scheduler_config)
