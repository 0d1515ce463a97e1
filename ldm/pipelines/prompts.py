"""Prompt files for sample grids: one prompt per line with per-line options, as kohya sd-scripts'
``--sample_prompts`` files have them.

    a red circle on a black background --n blurry --l 4 --s 20 --d 7 --w 32 --h 32

``--n`` negative prompt, ``--l`` guidance scale, ``--s`` steps, ``--d`` seed, ``--w`` / ``--h``
width / height in pixels. Blank lines and lines starting with ``#`` are skipped. A line with an
unknown option, a missing or malformed value, or no prompt is an error naming the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ldm.core.errors import ConfigError

OPTIONS = {"n": ("negative_prompt", str), "l": ("guidance_scale", float), "s": ("steps", int),
           "d": ("seed", int), "w": ("width", int), "h": ("height", int)}  # fmt: skip
_SPLIT = re.compile(r"(?:^|\s)--(\S*)")


@dataclass(frozen=True)
class SamplePrompt:
    """One line: the prompt and its options (None: the run's ``sample`` settings)."""

    prompt: str
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    steps: int | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None


def parse_prompt_line(line: str, where: str = "line") -> SamplePrompt:
    """One line -> ``SamplePrompt``; ``ConfigError`` naming ``where`` when it is malformed."""
    parts = _SPLIT.split(line)  # [prompt, name, value, name, value, ...]
    prompt = parts[0].strip()
    if not prompt:
        raise ConfigError(f"{where}: no prompt before the options: {line.strip()!r}")
    values: dict = {}
    for name, raw in zip(parts[1::2], parts[2::2], strict=True):
        if name not in OPTIONS:
            allowed = " ".join(f"--{k}" for k in OPTIONS)
            raise ConfigError(f"{where}: unknown option --{name} (allowed: {allowed}): {line.strip()!r}")
        key, kind = OPTIONS[name]
        text = raw.strip()
        if not text:
            raise ConfigError(f"{where}: --{name} needs a value: {line.strip()!r}")
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(
                f"{where}: --{name} {text!r} is not a {kind.__name__}: {line.strip()!r}"
            ) from None
        if key in ("steps", "width", "height") and value <= 0:
            raise ConfigError(f"{where}: --{name} must be positive, got {value}")
        values[key] = value
    return SamplePrompt(prompt, **values)


def read_prompt_file(path: str | Path) -> list[SamplePrompt]:
    """Every prompt of the file, in order; ``ConfigError`` for a missing file, an empty one or a bad line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sample.prompts_file: no file at {path}")
    prompts = [
        parse_prompt_line(line, f"{path}:{number}")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise ConfigError(f"sample.prompts_file: {path} has no prompts (blank lines and # comments only)")
    return prompts
