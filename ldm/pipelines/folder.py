"""What a diffusers pipeline folder must hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldm.core.errors import MissingFileError

PIPELINE_PARTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")  # what an SDXL pipeline folder has besides
MODEL_INDEX = "model_index.json"


def pipeline_index(root: str | Path) -> dict[str, Any]:
    """The folder's ``model_index.json`` (its pipeline class and settings), or {} when it has none."""
    path = Path(root) / MODEL_INDEX
    return json.loads(path.read_text()) if path.is_file() else {}


def is_sdxl_folder(root: str | Path) -> bool:
    """Whether ``root`` holds an SDXL pipeline: ``text_encoder_2/`` and ``tokenizer_2/`` (as
    ``StableDiffusionXLPipeline`` saves them). One without the other is an error."""
    root = Path(root)
    present = [p for p in SDXL_PARTS if (root / p).is_dir()]
    if present and len(present) < len(SDXL_PARTS):
        missing = [p for p in SDXL_PARTS if p not in present]
        raise MissingFileError(
            f"{root} has {present[0]}/ but not {missing[0]}/: an SDXL pipeline folder needs both"
        )
    return bool(present)


def is_pixel_folder(root: str | Path) -> bool:
    """Whether ``root`` holds a pixel-space model: its ``model_index.json`` names no autoencoder
    (``"vae": [null, null]``, as diffusers saves a pipeline built with ``vae=None``)."""
    vae = pipeline_index(root).get("vae", ["", ""])
    return isinstance(vae, list) and all(v is None for v in vae)


def check_pipeline_folder(path: str | Path, parts: tuple[str, ...] = PIPELINE_PARTS) -> Path:
    """``path`` if it holds a diffusers pipeline's ``parts``, else a ``MissingFileError`` (a
    ``FileNotFoundError``) saying what to do."""
    root = Path(path)
    if not root.is_dir():
        raise MissingFileError(f"no model at {root}: the folder does not exist")
    pixel = is_pixel_folder(root)  # a pixel-space model has no vae/
    missing = [p for p in parts if not (root / p).is_dir() and not (pixel and p == "vae")]
    if missing:
        raise MissingFileError(
            f"{root} is not a diffusers pipeline folder: missing {', '.join(m + '/' for m in missing)}; "
            "give the model/ folder of a train_ldm.py run or a Stable Diffusion folder"
        )
    return root
