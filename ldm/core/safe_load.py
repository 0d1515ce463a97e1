"""Weights from files: safetensors by default, pickle files only when the user asks.

Unpickling a file can run any code its author put in it, and checkpoints come from strangers.
So weights are read from ``.safetensors``. A pickle file (``.bin``, ``.pt``, ``.pth``, ``.ckpt``,
``.pkl``) is refused with ``PickleRefusedError`` unless the caller passes ``allow_pickle=True``,
and even then it is read with ``torch.load(weights_only=True)``, which rebuilds tensors and
plain containers only. The one exception is a torchvision download whose file name carries the
SHA-256 prefix that torchvision checks (``vgg16-397923af.pth``) and whose content matches it.

``python -m ldm.core.safe_load IN.pth [OUT.safetensors]`` converts a pickle file once (weights only).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ldm.core.errors import MissingFileError, ModelError, UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
logger = logging.getLogger("ldm")
TORCHVISION_HASH = re.compile(r"-([a-f0-9]{8,})\.")  # torchvision's file names: name-<sha256 prefix>.pth
UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")  # in torch's weights_only refusal


class PickleRefusedError(UserError, ValueError):
    """A pickle weights file met without ``allow_pickle=True``."""


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """A pickle weights file, allowed, that holds more than tensors: ``weights_only=True`` refused it."""


def pickle_refused(path: str | Path) -> PickleRefusedError:
    return PickleRefusedError(
        f"{path} is a pickle file, which can run code when it is loaded; ldm loads weights from "
        f".safetensors. If you trust its source, pass allow_pickle=True (allow_pickle=true in a "
        f"training config, --allow-pickle for ldm-sample): it is then read with weights_only=True. "
        f"Or convert it once: python -m ldm.core.safe_load {path}"
    )


def torchvision_verified(path: str | Path) -> bool:
    """True when ``path`` is named like a torchvision download and its SHA-256 starts with that name's hash."""
    match = TORCHVISION_HASH.search(Path(path).name)
    if match is None:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(match.group(1))


def load_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or from a pickle file under the policy above."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if not (allow_pickle or torchvision_verified(path)):
        raise pickle_refused(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = UNSUPPORTED_GLOBAL.search(str(err))
        what = (
            f"it refers to {found.group(1)}, which is not a tensor type"
            if found
            else "it holds more than tensors"
        )
        raise UnsafePickleError(
            f"{path} cannot be read with weights_only=True: {what}. ldm does not run code from weights "
            "files: get a .safetensors version from its source"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning-style wrapper
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def check_model_folder(folder: str | Path, allow_pickle: bool = False, what: str = "model") -> Path:
    """``folder`` if it holds a diffusers or transformers model (``config.json`` plus weights) that may
    be loaded under the policy; else ``MissingFileError`` or ``PickleRefusedError`` saying what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"no {what} at {folder}: the folder does not exist")
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"{what} folder {folder} has no config.json")
    if any(folder.glob("*.safetensors")):
        return folder
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise pickle_refused(pickles[0])
    if not pickles:
        raise MissingFileError(f"{what} folder {folder} has a config.json but no weights (*.safetensors)")
    return folder


def from_pretrained_kwargs(allow_pickle: bool = False) -> dict[str, bool | None]:
    """``use_safetensors`` for diffusers / transformers ``from_pretrained``: safetensors only, or
    safetensors first with a pickle fallback that both libraries read with ``weights_only=True``."""
    return {"use_safetensors": None if allow_pickle else True}
