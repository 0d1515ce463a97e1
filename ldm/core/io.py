"""Small file helpers: atomic writes of JSON and folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def umask_permissions(path: Path) -> None:
    """Give ``path`` (a file, or every file in a folder) the permissions of the process's umask, as
    ``open`` would: safetensors writes its files owner-only (0600), which other users and tools on a
    shared machine cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else [Path(path)]
    for f in files:
        os.chmod(f, 0o666 & ~mask)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final``, replacing what was there."""
    final = Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
