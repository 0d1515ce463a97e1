"""SIGTERM and SIGINT as a request to stop cleanly: finish the step, save a checkpoint, exit 0.

Clusters send SIGTERM before they preempt a job, and Ctrl-C sends SIGINT; either way the run
should lose nothing and resume with ``--resume latest``. A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
from accelerate import Accelerator

logger = logging.getLogger("ldm")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager; ``should_stop(accelerator)`` at the end of each step says whether to stop
    there (all processes agree: the request of any one stops them all)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # the second one: stop now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt(f"{name} received twice")
        self.signal_name = name
        logger.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)", name)

    def should_stop(self, accelerator: Accelerator, sync_point: bool) -> bool:
        """Whether to stop after this step. With several processes they agree only at ``sync_point``
        steps (the logging steps, which read values back anyway), so other steps never wait."""
        requested = self.signal_name is not None
        if accelerator.num_processes == 1:
            return requested
        if not sync_point:
            return False
        flag = torch.tensor(float(requested), device=accelerator.device)
        anyone = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        if anyone and not requested:
            self.signal_name = "a signal to another process"
        return anyone
