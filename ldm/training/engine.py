"""The engine accelerate runs a training on, and what the trainers do differently under each.

    DDP        every process holds the whole model; gradients are all-reduced (accelerate's default)
    FSDP2      each process holds 1/P of the trained weights, gradients and optimizer state; a unit's
               weights are all-gathered for its forward (``fully_shard``, torch >= 2.6)
    DeepSpeed  ZeRO stage 2: 1/P of the gradients and optimizer state per process, weights whole

Under FSDP2 a trained weight is a ``DTensor`` shard. What needs it whole gathers it, on every process
at once (a collective; a process that skipped it would hang the others): the export and the sample
grids (``accelerator.get_state_dict``), the EMA checkpoint (``full_tensors``), the logged gradient
norm. accelerate promotes a launch to FSDP or DeepSpeed on accelerators only: on CPUs the same launch
silently trains as plain DDP, which ``check_engine`` refuses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ldm.core.errors import ConfigError

REQUESTS = {
    "ACCELERATE_USE_FSDP": DistributedType.FSDP,
    "ACCELERATE_USE_DEEPSPEED": DistributedType.DEEPSPEED,
}


def requested_engine() -> DistributedType | None:
    """The engine ``accelerate launch --config_file ...`` asked for (its environment), if any."""
    for variable, engine in REQUESTS.items():
        if os.environ.get(variable, "false").lower() == "true":
            return engine
    return None


def check_engine(accelerator: Accelerator) -> None:
    """Raise when the launch asked for FSDP or DeepSpeed and accelerate runs something else, or runs
    FSDP version 1 (ldm's gathers are FSDP2's)."""
    asked, runs = requested_engine(), accelerator.distributed_type
    if asked is not None and runs != asked:
        raise ConfigError(
            f"the launch asked for {asked.value}, but accelerate runs {runs.value} on this machine "
            f"({accelerator.device.type}): accelerate starts {asked.value} on accelerators only, and the run "
            "would silently train without it. Launch on GPUs, or drop the FSDP/DeepSpeed config file "
            "(configs/accelerate/multi-gpu.yaml with --cpu is data parallel on CPUs)"
        )
    if runs == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(
            "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
            "(configs/accelerate/fsdp.yaml), or pass --fsdp_version 2 to accelerate launch"
        )


def process_group_kwargs() -> list:
    """accelerate's ``kwargs_handlers`` for the launch: DeepSpeed on CPUs needs the gloo backend named
    (accelerate picks none without CUDA, and would count one process while DeepSpeed runs P)."""
    from accelerate.utils import InitProcessGroupKwargs

    if requested_engine() == DistributedType.DEEPSPEED and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def configure_deepspeed(
    accelerator: Accelerator, batch_size: int, accumulation: int, grad_clip: float
) -> None:
    """Under DeepSpeed, its config from the run's: the micro-batch (``train.batch_size``: no DataLoader
    goes through ``prepare``, from which accelerate would read an ``auto`` one), the accumulation and
    the gradient clipping (DeepSpeed clips inside its step)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = accumulation
    config["gradient_clipping"] = grad_clip
    config.pop("train_batch_size", None)  # DeepSpeed computes it: micro-batch x accumulation x processes


def takes_one_model(accelerator: Accelerator) -> bool:
    """Whether ``prepare`` takes one model only (FSDP2 and DeepSpeed), which must then hold everything
    that trains."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def flattens_weights(accelerator: Accelerator) -> bool:
    """Whether the engine copies the weights into flat buffers (FSDP2 shards, DeepSpeed's partitions),
    which takes contiguous weights only (not channels-last convolution kernels)."""
    return takes_one_model(accelerator)


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether trained weights are FSDP shards (each process holds 1/P of them)."""
    return accelerator.distributed_type == DistributedType.FSDP


def callable_units(accelerator: Accelerator, modules: Iterable[torch.nn.Module]) -> None:
    """Under FSDP, make each of ``modules`` (submodules of the one prepared model) an FSDP unit of its
    own, so that it can be called alone (the UNet and a trained text encoder, by the sampler): a unit
    gathers its weights in its own forward, while weights left to the root are gathered only by the
    root's. Adds their classes to the plugin's ``transformer_cls_names_to_wrap``."""
    if not is_sharded(accelerator):
        return
    plugin = accelerator.state.fsdp_plugin
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy is not None and "transformer" not in getattr(policy, "__name__", ""):
        raise ConfigError(
            "ldm's FSDP runs need fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP "
            "(configs/accelerate/fsdp.yaml), so that the UNet is an FSDP unit that sampling can call"
        )
    names = list(plugin.transformer_cls_names_to_wrap or [])
    for module in modules:
        name = unsharded_class(module).__name__
        if name not in names:
            names.append(name)
    plugin.transformer_cls_names_to_wrap = names
    if policy is None:  # NO_WRAP: wrap these units (and the root) only
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin.auto_wrap_policy = transformer_auto_wrap_policy


def broadcast_weights(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """Under FSDP, every process's copy of ``module`` made equal to the main process's before it is
    sharded: each process initialised its own (seeded by rank), and ``fully_shard`` keeps each
    process's slice of its own copy, where DDP would have broadcast the main process's weights."""
    if not is_sharded(accelerator) or accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def unsharded_class(module: torch.nn.Module) -> type:
    """The module's own class (``fully_shard`` swaps in a subclass ``FSDP<Name>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP shard of a weight)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A ``DTensor`` gathered whole (a collective: every process calls it); any other tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_tensors(tensors: Iterable[torch.Tensor], keep: bool = True) -> list[torch.Tensor]:
    """Each tensor whole, on the CPU (one at a time: at most one gathered tensor on the device).
    ``keep=False`` (a process that only joins the gathers): the shards gathered and dropped, nothing
    copied, an empty list."""
    if not keep:
        for t in tensors:
            if is_dtensor(t):
                full_tensor(t)
        return []
    return [full_tensor(t).detach().cpu().contiguous() for t in tensors]


def shard_like(full: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``template``: this process's shard when ``template`` is a ``DTensor``
    (``distribute_tensor``, a collective), else ``full`` on its device and in its dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(template, DTensor):
        full = full.to(template.device_mesh.device_type, template.dtype)
        return distribute_tensor(full, template.device_mesh, template.placements)
    return full.to(template.device, template.dtype)
