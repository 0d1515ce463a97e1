"""What both training programs do around their loops: start a run, resume it, feed it batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import Dataset, IterableDataset

from ldm.core.config import DataConfig, TrainConfig, to_yaml
from ldm.core.io import write_json
from ldm.core.randomness import StepRandom
from ldm.training.checkpoint import load_checkpoint, resolve_checkpoint
from ldm.training.engine import check_engine, configure_deepspeed, process_group_kwargs
from ldm.training.loader import TrainBatches
from ldm.training.metrics import MetricsWriter
from ldm.training.trackers import init_trackers, trackers_for

logger = logging.getLogger("ldm")


def start_run(cfg: Any, train: TrainConfig) -> tuple[Accelerator, Path]:
    """The accelerator, per-process seeds (seed + rank) and ``config.yaml`` in the output folder."""
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_with=trackers_for(train.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=process_group_kwargs(),
    )
    check_engine(accelerator)
    configure_deepspeed(accelerator, train.batch_size, train.gradient_accumulation_steps, train.grad_clip)
    set_seed(cfg.seed, device_specific=True)
    if accelerator.device.type == "cuda":  # fp32 matmuls and convolutions on TF32 tensor cores, or not
        torch.backends.cuda.matmul.allow_tf32 = train.tf32
        torch.backends.cudnn.allow_tf32 = train.tf32
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    return accelerator, out


def resume_run(
    accelerator: Accelerator, out: Path, resume: str | None, ema=None
) -> tuple[int, dict | None, dict | None]:
    """(step, data state, ``StepRandom`` state) of the checkpoint ``resume`` names (``latest`` or a
    folder); (0, None, None) without one."""
    if not resume:
        return 0, None, None
    path = resolve_checkpoint(out, resume)
    state = load_checkpoint(accelerator, path, ema)
    logger.info("resumed from %s at step %d", path, state["step"])
    return state["step"], state["data"], state.get("rng")


@dataclass
class Resumed:
    """Where a run starts: its step, its batches from there, its metrics file and its random stream."""

    step: int
    batches: TrainBatches
    metrics: MetricsWriter
    rng: StepRandom


def resume_training(
    accelerator: Accelerator,
    out: Path,
    resume: str | None,
    ema,
    dataset,
    train: TrainConfig,
    data: DataConfig,
    seed: int,
    run_config: Any = None,
) -> Resumed:
    """The checkpoint ``resume`` names (or a fresh start), with the batches, metrics and random stream
    that continue it; the trackers start here (from that step, with ``run_config`` as hyperparameters)."""
    step, data_state, rng_state = resume_run(accelerator, out, resume, ema)
    init_trackers(accelerator, run_config, out, step)
    batches = train_batches(accelerator, dataset, train, data, seed, data_state)
    metrics = metrics_writer(accelerator, out, step)
    rng = StepRandom(seed, accelerator.process_index, accelerator.num_processes, accelerator.device)
    if rng_state is not None:  # resumed: continue the stream where the checkpoint left it
        rng.load_state_dict(rng_state)
    return Resumed(step, batches, metrics, rng)


def train_batches(
    accelerator: Accelerator,
    dataset: Dataset | IterableDataset,
    train: TrainConfig,
    data: DataConfig,
    seed: int,
    state,
) -> TrainBatches:
    """This process's endless, resumable stream of training batches."""
    return TrainBatches(
        dataset,
        train.batch_size,
        seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=data.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        state=state,
    )


def averaged(accelerator: Accelerator, sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """``sums`` (the same keys on every process) averaged over the processes, as floats: the logged
    losses are those of the global batch. A value of two elements is a (sum, count) pair: its
    figure is sum / count over all processes (a loss over some items of each batch, such as
    DreamBooth's class images), left out where the count is 0. One collective, at logging steps only."""
    keys = sorted(sums)
    flat = [
        torch.as_tensor(sums[k], dtype=torch.float32, device=accelerator.device).reshape(-1) for k in keys
    ]
    stacked = torch.cat(flat)
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, "mean")
    values, out, start = stacked.tolist(), {}, 0
    for key, f in zip(keys, flat, strict=True):
        if f.numel() == 1:
            out[key] = values[start]
        elif values[start + 1] > 0:  # (sum, count)
            out[key] = values[start] / values[start + 1]
        start += f.numel()
    return out


def process_mean(accelerator: Accelerator):
    """tensor -> its mean over the processes (the global batch's value); itself on one process."""

    def mean(tensor: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(tensor, "mean") if accelerator.num_processes > 1 else tensor

    return mean


def global_batch_line(batch_size: int, processes: int, accumulation: int) -> str:
    return (
        f"global batch {batch_size * processes * accumulation} "
        f"({batch_size} per process x {processes} processes x {accumulation} accumulation)"
    )


def metrics_writer(accelerator: Accelerator, out: Path, step: int) -> MetricsWriter:
    """``metrics.jsonl`` on the main process, without lines past ``step`` (a resumed run redoes them)."""
    metrics = MetricsWriter(
        out / "metrics.jsonl",
        enabled=accelerator.is_main_process,
        log=accelerator.log if accelerator.trackers else None,
    )
    metrics.truncate_after(step)
    return metrics


def set_lr(optimizer, lr: float) -> None:
    """Every parameter group at ``lr`` times its own ``lr_scale`` (1 unless the group sets one, as the
    new tokens' rows do for ``ti.lr``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def finish_run(accelerator: Accelerator, out: Path, results: dict | None) -> Path:
    """On the main process, ``eval.json``; then every process ends the run."""
    if accelerator.is_main_process and results is not None:
        write_json(out / "eval.json", results)
        logger.info("wrote %s: %s", out / "eval.json", results)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out
