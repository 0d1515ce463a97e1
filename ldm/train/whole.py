"""Stage 2's pipeline with whole weights on the main process, for the sample grids and the export.

DDP and DeepSpeed ZeRO-2 keep whole weights on every process: the pipeline is built over the trained
modules themselves, no copy. Under FSDP each process holds a shard of them: every process gathers
(``accelerator.get_state_dict``, a collective), and the main process loads the full state into plain
copies of the trained networks (built on the meta device and assigned the gathered tensors: one copy
of the weights, on the main process only, while the pipeline lives).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator, init_empty_weights
from diffusers import ModelMixin

from conditioning import Conditioner
from ldm.models.unet import set_attention_backend
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.train.setup import training_pipeline
from ldm.train.trained import TrainedModules
from ldm.training.engine import is_sharded, unsharded_class


def plain_copy(
    module: torch.nn.Module, state: dict[str, torch.Tensor], device: torch.device
) -> torch.nn.Module:
    """A new, unsharded module of ``module``'s class and config, holding ``state`` (its full weights,
    which accelerate gathers to the CPU), on ``device``."""
    cls = unsharded_class(module)
    with init_empty_weights():
        copy = cls.from_config(module.config) if issubclass(cls, ModelMixin) else cls(module.config)
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.to(device).eval()


def substate(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


class WholePipeline:
    """``()`` on every process: the pipeline on the main process, None on the others."""

    def __init__(
        self, accelerator: Accelerator, vae, conditioner: Conditioner, trained, objective, attention: str
    ):
        self.accelerator, self.vae, self.conditioner = accelerator, vae, conditioner
        self.trained, self.objective, self.attention = trained, objective, attention

    @property
    def modules(self) -> TrainedModules:
        return self.accelerator.unwrap_model(self.trained)

    def __call__(self) -> LatentDiffusionPipeline | None:
        acc, modules = self.accelerator, self.modules
        if not is_sharded(acc):
            return (
                training_pipeline(self.vae, self.conditioner, modules.unet, self.objective)
                if acc.is_main_process
                else None
            )
        state = acc.get_state_dict(self.trained)  # every process: all-gathers each unit in turn
        if not acc.is_main_process:
            return None
        device = acc.device
        unet = plain_copy(modules.unet, substate(state, "unet."), device)
        set_attention_backend(unet, self.attention, device)
        names = {id(m): name for name, m in modules.named_modules()}
        texts = [
            plain_copy(e.model, substate(state, names[id(e.model)] + "."), device)
            if id(e.model) in names
            else e.model
            for e in self.conditioner.encoders
        ]
        return training_pipeline(self.vae, self.conditioner, unet, self.objective, texts)
