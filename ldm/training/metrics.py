"""One place to log training figures: ``metrics.jsonl`` lines (and the trackers), on the main process only."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("ldm")


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    Keys are namespaced (``train/loss``, ``val/psnr``); tensors must be converted by the
    caller, at logging time only, so that the training step never syncs with the host.
    """

    def __init__(self, path: Path, enabled: bool = True, log: Callable[..., None] | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.log = log  # the trackers' too (``Accelerator.log``), when the run has any
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step`` (a resumed run rewrites the steps it redoes)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.log is not None:  # numbers only (a non-finite value is text in the JSON line)
            self.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=step)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
