"""``torch.compile`` for the training forward (``train.compile``).

The compiled wrapper shares its parameters with the module it wraps. Only the loss calls it:
sampling grids, evaluation, checkpoints and the export keep using the plain module, so they
neither recompile for their own shapes nor see the wrapper's ``_orig_mod.`` state-dict keys.
Shapes are static (``dynamic=False``): a new shape (another resolution bucket) compiles once more.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

logger = logging.getLogger("ldm")


class CompileUnavailableError(RuntimeError):
    pass


def check_compiler(device: torch.device) -> None:
    """TorchInductor writes C++ on the CPU and Triton on GPUs; say what is missing before training starts."""
    if device.type == "cpu":
        cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if cxx is None or not shutil.which(cxx):
            raise CompileUnavailableError(
                "train.compile=true on the CPU needs a C++ compiler for TorchInductor and none was found "
                "(g++, c++, clang++ or $CXX); install one (apt-get install g++) or set train.compile=false"
            )
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompileUnavailableError(
                "train.compile=true on CUDA needs Triton (pip install triton); or set train.compile=false"
            )


def compiled_for_training(module: torch.nn.Module, enabled: bool, device: torch.device) -> torch.nn.Module:
    """``torch.compile(module, dynamic=False)`` when ``enabled``, else ``module`` itself."""
    if not enabled:
        return module
    check_compiler(device)
    logger.info("train.compile: the first step compiles the training forward and backward (once per shape)")
    return torch.compile(module, dynamic=False)
