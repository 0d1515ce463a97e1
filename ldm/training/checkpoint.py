"""Resumable training state: atomic checkpoints with a ``latest`` pointer.

Layout, under ``<output_dir>/checkpoints/``::

    step-000500/          accelerate state (models as safetensors, optimizers, RNG)
      ema.safetensors     EMA weights, when EMA is on
      trainer_state.json  step, data position and EMA counters, written last
    latest                name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step-XXXXXX`` and renamed into place, and only then
does ``latest`` move (itself written to a temporary file and renamed): a crash at any
moment leaves ``latest`` naming a complete checkpoint. A write that fails (a full disk)
removes the partial folder and raises ``CheckpointWriteError``; older checkpoints and
``latest`` are untouched.

Nothing here unpickles code: accelerate reads its files with ``weights_only=True``, and the
EMA (which accelerate's ``register_for_checkpointing`` would unpickle without that guard) is
kept as safetensors plus JSON (with one exception below). Under DeepSpeed, the model and optimizer are DeepSpeed's own
checkpoint (``pytorch_model/*.pt``, pickles that DeepSpeed itself loads with ``weights_only=False``:
resume only from checkpoints you wrote); under FSDP, accelerate's
distributed checkpoint (one shard per process). The EMA file holds whole tensors under every engine.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from ldm.core.errors import MissingFileError, UserError
from ldm.training.engine import full_tensors, shard_like

logger = logging.getLogger("ldm")

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
LATEST = "latest"


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written; the previous one and ``latest`` are intact."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ema_state(ema: EMAModel, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON counters) of diffusers' ``EMAModel.state_dict()``, each tensor whole: FSDP
    shards are gathered (every process calls this; ``keep=False`` gathers and drops them, the tensors
    being the main process's to write), so the file is the same under every engine."""
    state = ema.state_dict()
    tensors = {f"shadow.{i}": p for i, p in enumerate(full_tensors(state.pop("shadow_params"), keep))}
    return tensors, state


def load_ema_state(ema: EMAModel, tensors: dict[str, torch.Tensor], counters: dict[str, Any]) -> None:
    """The saved (whole) tensors into ``ema``, each laid out as its current shadow (an FSDP shard)."""
    if len(tensors) != len(ema.shadow_params):
        raise MissingFileError(
            f"the checkpoint's EMA has {len(tensors)} tensors and this run averages {len(ema.shadow_params)}: "
            "it was saved by another model or trained parameter set; resume with the same config"
        )
    shadow = [shard_like(tensors[f"shadow.{i}"], s) for i, s in enumerate(ema.shadow_params)]
    ema.load_state_dict({**counters, "shadow_params": shadow})


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int,
    ema: EMAModel | None = None,
) -> Path:
    """Save the accelerator's state, ``ema`` and ``state`` (JSON) as ``step-XXXXXX``; keep the newest ``keep``.

    Raises ``CheckpointWriteError`` (after removing the partial folder) when the write fails.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        ema_tensors = None  # every process calls ema_state (FSDP gathers); the main one keeps its tensors
        if ema is not None:
            ema_tensors = ema_state(ema, keep=accelerator.is_main_process)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if ema_tensors is not None:
                tensors, counters = ema_tensors
                save_file(tensors, str(tmp / EMA_FILE))
                state = {**state, "ema": counters}
            _write_atomic(tmp / STATE_FILE, json.dumps({"step": step, **state}, indent=2))
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(err, final, root) from err
    if accelerator.is_main_process:
        if final.exists():  # a resumed run redoing a step it had already saved
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        _prune(root, keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _write_error(err: OSError, final: Path, root: Path) -> CheckpointWriteError:
    pointer = root / LATEST
    previous = f"{pointer.read_text().strip()} (named by {pointer})" if pointer.exists() else "none yet"
    why = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "the write failed"
    return CheckpointWriteError(
        err.errno,
        f"could not save checkpoint {final.name} in {root}: {why} ({err.strerror or err}). "
        f"The partial folder was removed; the last complete checkpoint is {previous}. "
        "Free space (or lower train.keep_checkpoints), then resume with --resume latest",
    )


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(output_dir: Path, resume: str) -> Path:
    """``latest`` -> the checkpoint named by ``checkpoints/latest``; else a checkpoint folder path."""
    if resume == LATEST:
        pointer = Path(output_dir) / "checkpoints" / LATEST
        if not pointer.exists():
            raise MissingFileError(
                f"--resume latest: no checkpoint in {pointer.parent} (nothing saved yet); run without --resume"
            )
        path = pointer.parent / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / STATE_FILE).exists():
        what = f"{path} is" if resume == LATEST else "that is"
        raise MissingFileError(
            f"--resume {resume}: {what} not a complete checkpoint (no {STATE_FILE}); give 'latest' or a "
            f"checkpoint folder such as {Path(output_dir) / 'checkpoints' / checkpoint_name(500)}"
        )
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, ema: EMAModel | None = None) -> dict[str, Any]:
    """Restore the accelerator's state (and ``ema``) from ``path``; return its trainer state."""
    accelerator.load_state(str(path))
    state = json.loads((Path(path) / STATE_FILE).read_text())
    if ema is not None:
        if not (Path(path) / EMA_FILE).exists() or "ema" not in state:
            raise MissingFileError(
                f"{path} has no {EMA_FILE}: it was saved without EMA (or by an older ldm); "
                "resume with train.ema_decay=0, or start a new run"
            )
        load_ema_state(ema, load_file(str(Path(path) / EMA_FILE)), state["ema"])
        ema.to(accelerator.device)
    return state
