"""ldm: latent diffusion, end to end.

``from ldm import LatentDiffusionPipeline`` is the public API; it is imported on first use,
so that the shared modules (``ldm.core.config``, ``ldm.data``, ``ldm.training``) stay light for
stage 1 and the conditioning package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LatentDiffusionPipeline", "PipelineOutput", "SAMPLERS"]

if TYPE_CHECKING:
    from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline, PipelineOutput
    from ldm.pipelines.samplers import SAMPLERS


def __getattr__(name: str) -> Any:
    if name in ("LatentDiffusionPipeline", "PipelineOutput"):
        from ldm.pipelines import latent_diffusion

        return getattr(latent_diffusion, name)
    if name == "SAMPLERS":
        from ldm.pipelines.samplers import SAMPLERS

        return SAMPLERS
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
