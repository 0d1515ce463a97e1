"""The training loop both stages run: each gives its setup and a step that returns its loss terms.

    for each optimizer step:  lr <- train.lr * lr_multiplier(step)            (warm-up, cosine, ...)
                              for each micro-batch: terms = stage.step(...)    (accumulation)
                              EMA update; stop signals; log; validation loss; sample grid; checkpoint

The stage's step calls ``update(loss, optimizer, params)`` for each of its losses: backward, gradient
clipping, the optimizer step (skipped on the device when the loss is NaN or Inf, see
``NonFiniteGuard``) and ``zero_grad``. What happens after the loop (export, evaluation) is the
stage's too: ``train_loop`` returns the step reached, below ``train.max_steps`` when stopped early.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from ldm.core.config import TrainConfig
from ldm.core.randomness import StepRandom
from ldm.training.checkpoint import save_checkpoint
from ldm.training.ema import EMA
from ldm.training.loader import TrainBatches
from ldm.training.metrics import MetricsWriter
from ldm.training.nonfinite import NonFiniteGuard
from ldm.training.optim import averaged_weights, clip_gradients, set_optimizer_mode
from ldm.training.run import averaged, set_lr
from ldm.training.schedule import lr_multiplier
from ldm.training.signals import GracefulStop
from ldm.training.trackers import log_image
from ldm.training.validation import synchronize

logger = logging.getLogger("ldm")


class Update:
    """One optimizer's update from one loss: backward, clipping, the guarded step, ``zero_grad``."""

    def __init__(self, accelerator: Accelerator, grad_clip: float, max_nonfinite_steps: int):
        self.accelerator = accelerator
        self.grad_clip = grad_clip
        self.max_nonfinite_steps = max_nonfinite_steps
        self.guards: dict[int, NonFiniteGuard] = {}  # one per optimizer

    def __call__(
        self, loss: Tensor, optimizer: torch.optim.Optimizer, clip: list[nn.Parameter] | None = None
    ) -> Tensor | None:
        """Returns the gradient norm of ``clip`` before clipping (None when not clipped)."""
        acc = self.accelerator
        acc.backward(loss)
        norm = None
        if clip is not None and acc.sync_gradients and self.grad_clip > 0:
            norm = clip_gradients(acc, clip, self.grad_clip).detach()
        guard = self.guards.get(id(optimizer))
        if guard is None:
            agree = None
            if acc.num_processes > 1:  # one 8-byte all-reduce per update

                def agree(bad: Tensor) -> Tensor:
                    return acc.reduce(bad.long(), "sum") > 0

            guard = self.guards[id(optimizer)] = NonFiniteGuard(self.max_nonfinite_steps, acc.device, agree)
        guard.step(optimizer, loss, acc.scaler, acc.sync_gradients)
        optimizer.zero_grad(set_to_none=True)
        return norm

    def skipped_steps(self) -> int:
        """NaN/Inf steps since the last call, all optimizers; too many in a row raise."""
        return sum(guard.check() for guard in self.guards.values())


StepFn = Callable[[dict, int, StepRandom, Update], dict[str, Tensor]]


@dataclass
class Stage:
    """What a stage gives the loop."""

    name: str  # the progress bar's label
    step: StepFn  # (batch, step, rng, update) -> detached loss terms of one micro-batch
    modules: Sequence[nn.Module]  # set to train mode; what gradient accumulation runs over
    # (optimizer, its base lr or None for train.lr): lr = base * train.lr * multiplier / train.lr
    optimizers: Sequence[tuple[torch.optim.Optimizer, float | None]]
    ema_params: list[nn.Parameter] = field(default_factory=list)  # what EMA averages
    sample: Callable[[Path], None] | None = (
        None  # a sample grid: every process calls it (FSDP gathers), the main one writes
    )
    validate: Callable[[], dict[str, float]] | None = None  # val/* figures (every process: a collective)
    progress_key: str = "loss"  # the term shown on the progress bar
    log_compile: bool = False  # log the first step's time (compiling included)


def train_loop(
    accelerator: Accelerator,
    out: Path,  # the run folder: samples/, checkpoints/
    train: TrainConfig,  # lr schedule, accumulation, logging, sampling and checkpoint intervals
    stage: Stage,
    batches: TrainBatches,  # this process's endless, resumable batches
    rng: StepRandom,  # the step's draws, process-count independent; checkpointed
    step: int,  # the step to start at (0, or the resumed checkpoint's)
    metrics: MetricsWriter,
    ema: EMA | None = None,
) -> int:
    """Train from ``step`` to ``train.max_steps`` (or ``train.stop_at``, or a SIGTERM / SIGINT, which
    checkpoint where they stop); returns the step reached. At ``train.max_steps`` the EMA weights (when
    EMA is on) are copied into the model for the export."""
    main = accelerator.is_main_process
    update = Update(accelerator, train.grad_clip, train.max_nonfinite_steps)
    stop = min(train.max_steps, train.stop_at) if train.stop_at else train.max_steps
    with GracefulStop() as stopper:
        progress = tqdm(
            total=train.max_steps, initial=step, disable=not main, desc=stage.name, dynamic_ncols=True
        )
        sums: dict[str, Tensor] = {}  # summed on the device; read back only when logging
        counts: dict[str, int] = {}
        count, t_log = 0, time.perf_counter()
        first_step = step
        validate = stage.validate if train.val_every else None
        for module in stage.modules:
            module.train()  # (a frozen text encoder stays in eval mode: TextEncoder.train)
        optimizers = [optimizer for optimizer, _ in stage.optimizers]
        set_optimizer_mode(optimizers, train=True)  # schedule-free: the weights it steps
        while step < stop:
            lr = train.lr * lr_multiplier(
                step, train.lr_warmup_steps, train.max_steps, train.lr_schedule, train.min_lr_ratio
            )
            for optimizer, base_lr in stage.optimizers:
                set_lr(optimizer, lr if base_lr is None else base_lr * lr / train.lr)
            for _ in range(train.gradient_accumulation_steps):
                batch = next(batches)
                with accelerator.accumulate(*stage.modules):
                    terms = stage.step(batch, step, rng, update)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0) + value
                    counts[key] = counts.get(key, 0) + 1
            if ema is not None:
                ema.step(stage.ema_params)
            step += 1
            count += 1
            progress.update(1)
            if stage.log_compile and step == first_step + 1:
                logger.info("first step, compiling included: %.1f s", time.perf_counter() - t_log)
            if stopper.should_stop(accelerator, step % train.log_every == 0):  # checkpoint here
                stop = step

            due = validate is not None and (step % train.val_every == 0 or step == train.max_steps)
            val = {}
            if due:  # on all processes; its figures go into this step's line
                synchronize(accelerator.device)  # the queued training steps belong to step_time
                t_val = time.perf_counter()
                with averaged_weights(optimizers):  # schedule-free: its averaged weights
                    val = validate()
                t_log += time.perf_counter() - t_val  # train/step_time counts training steps only
            if step % train.log_every == 0 or step == stop:
                means = averaged(accelerator, {k: v / counts[k] for k, v in sums.items()})
                values = {f"train/{k}": v for k, v in means.items()}
                values.update({"train/lr": lr, "train/step_time": (time.perf_counter() - t_log) / count})
                values["train/skipped_steps"] = update.skipped_steps()
                metrics.write(step, {**values, **val})
                if f"train/{stage.progress_key}" in values:
                    progress.set_postfix({stage.progress_key: f"{values[f'train/{stage.progress_key}']:.4f}"})
                sums, counts, count, t_log = {}, {}, 0, time.perf_counter()
            elif val:
                metrics.write(step, val)
            if stage.sample is not None and train.sample_every and step % train.sample_every == 0:
                with averaged_weights(optimizers):
                    stage.sample(out / "samples" / f"step-{step:06d}.png")
                if main:
                    log_image(accelerator, "samples", out / "samples" / f"step-{step:06d}.png", step)
            if step == stop or (train.checkpoint_every and step % train.checkpoint_every == 0):
                state = {"data": batches.state_dict(), "rng": rng.state_dict()}
                save_checkpoint(accelerator, out, step, state, train.keep_checkpoints, ema)
    progress.close()
    if step < train.max_steps:
        logger.info(
            "stopped at step %d of %d (%s); resume with --resume latest",
            step, train.max_steps, stopper.signal_name or "train.stop_at",
        )  # fmt: skip
    else:  # finished: schedule-free's averaged weights, or the EMA's, are the ones to export
        set_optimizer_mode(optimizers, train=False)
        if ema is not None:
            ema.copy_to(stage.ema_params)
    return step
