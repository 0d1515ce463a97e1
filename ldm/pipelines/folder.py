"""What a diffusers pipeline folder must hold."""

from __future__ import annotations

from pathlib import Path

from ldm.core.errors import MissingFileError

PIPELINE_PARTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_folder(path: str | Path, parts: tuple[str, ...] = PIPELINE_PARTS) -> Path:
    """``path`` if it holds a diffusers pipeline's ``parts``, else a ``MissingFileError`` (a
    ``FileNotFoundError``) saying what to do."""
    root = Path(path)
    if not root.is_dir():
        raise MissingFileError(f"no model at {root}: the folder does not exist")
    missing = [p for p in parts if not (root / p).is_dir()]
    if missing:
        raise MissingFileError(
            f"{root} is not a diffusers pipeline folder: missing {', '.join(m + '/' for m in missing)}; "
            "give the model/ folder of a train_ldm.py run or a Stable Diffusion folder"
        )
    return root
