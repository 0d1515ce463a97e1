"""Resumable training state: atomic checkpoints with a ``latest`` pointer.

Layout, under ``<output_dir>/checkpoints/``::

    step-000500/          accelerate state (models, optimizers, RNG, registered objects)
      trainer_state.json  step and data position, written last
    latest                name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step-XXXXXX`` and renamed into place, and only then
does ``latest`` move (itself written to a temporary file and renamed): a crash at any
moment leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

logger = logging.getLogger("ldm")

STATE_FILE = "trainer_state.json"
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, state: dict[str, Any], keep: int
) -> Path:
    """Save the accelerator's state plus ``state`` (JSON) as ``step-XXXXXX``; keep the newest ``keep``."""
    root = Path(output_dir) / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_atomic(tmp / STATE_FILE, json.dumps({"step": step, **state}, indent=2))
        if final.exists():  # a resumed run redoing a step it had already saved
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        _prune(root, keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(output_dir: Path, resume: str) -> Path:
    """``latest`` -> the checkpoint named by ``checkpoints/latest``; else a checkpoint folder path."""
    if resume == LATEST:
        pointer = Path(output_dir) / "checkpoints" / LATEST
        if not pointer.exists():
            raise FileNotFoundError(
                f"--resume latest: no checkpoint in {pointer.parent} (nothing saved yet); run without --resume"
            )
        path = pointer.parent / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"--resume {resume}: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore the accelerator's state from ``path``; return its trainer state (step, data position...)."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE_FILE).read_text())
