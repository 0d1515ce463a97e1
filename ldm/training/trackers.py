"""Experiment trackers through accelerate: ``train.report_to=none|tensorboard|wandb|all``.

accelerate's ``Accelerator(log_with=...)`` owns the trackers (main process only). The run's
``metrics.jsonl`` lines go to them as scalars (``MetricsWriter``), sample grids as images. TensorBoard
writes event files under ``output_dir/logs/``; wandb writes under ``output_dir/wandb/`` and honours
its own environment (``WANDB_MODE=offline``, ``WANDB_PROJECT``, ...). Both come with the ``tracking``
extra (``pip install -e ".[tracking]"``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import secrets
from pathlib import Path
from typing import Any

from ldm.core.errors import ConfigError

REPORT_TO = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}
PROJECT = "ldm"  # accelerate's project name: TensorBoard's subfolder of logs/, wandb's project by default
WANDB_ID = "wandb_id.txt"  # the run's wandb id, kept so that a resumed run continues the same wandb run


def trackers_for(report_to: str) -> list[str]:
    """accelerate's ``log_with`` for ``report_to``; an error saying what to install when one is missing."""
    names = REPORT_TO[report_to]
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ConfigError(
            f'train.report_to={report_to} needs {" and ".join(missing)}: pip install -e ".[tracking]" '
            "(or train.report_to=none)"
        )
    return names


def flat_config(cfg: Any, prefix: str = "") -> dict[str, int | float | str | bool]:
    """A config dataclass as ``{"train.lr": 1e-4, ...}``, values as TensorBoard's hparams take them
    (lists and None as text)."""
    flat: dict[str, int | float | str | bool] = {}
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            flat.update(flat_config(value, key + "."))
        else:
            flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def wandb_run_id(out: Path, step: int) -> str:
    """A new id for a run from step 0, the kept one for a resumed run (written by the main process)."""
    path = Path(out) / WANDB_ID
    if step > 0 and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def init_trackers(accelerator, cfg: Any, out: Path, step: int = 0) -> None:
    """Start the run's trackers (no-op without any), with its whole config. Resumed at ``step``:
    TensorBoard drops what the interrupted run logged after that checkpoint (``purge_step``), wandb continues the
    same run."""
    if not accelerator.log_with or not accelerator.is_main_process:
        return
    kwargs: dict[str, dict[str, Any]] = {"tensorboard": {"purge_step": step + 1} if step else {}}
    if "wandb" in [str(t) for t in accelerator.log_with]:
        kwargs["wandb"] = {
            "name": Path(out).name,
            "dir": str(out),
            "id": wandb_run_id(out, step),
            "resume": "allow",
        }
    project = os.environ.get("WANDB_PROJECT", PROJECT)
    accelerator.init_trackers(
        project, config=flat_config(cfg) if cfg is not None else None, init_kwargs=kwargs
    )


def log_image(accelerator, name: str, path: Path, step: int) -> None:
    """The image file at ``path`` (a sample grid) to every tracker, at ``step``."""
    import numpy as np
    from PIL import Image

    if not accelerator.is_main_process or not accelerator.trackers:
        return
    image = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3) uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, image, step, dataformats="HWC")
            tracker.writer.flush()
        else:
            tracker.log_images({name: [image]}, step=step)
