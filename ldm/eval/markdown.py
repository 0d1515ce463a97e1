"""``report.md``: a run's figures as Markdown tables, with its plots and sample grids.

A report is a title and a list of sections; a section is a heading, optional text, an optional
table (rows of equal-length cells) and optional images (paths, linked relative to the report).
Shared by both stages: it knows nothing of what the figures mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Section:
    heading: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[object]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)


def fmt(value: object) -> str:
    """A table cell: floats to 4 significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(title: str, sections: list[Section], folder: Path) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.heading}", ""]
        if section.text:
            lines += [section.text, ""]
        if section.header:
            lines.append("| " + " | ".join(section.header) + " |")
            lines.append("|" + "---|" * len(section.header))
            lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in section.rows]
            lines.append("")
        for image in section.images:
            if Path(image).exists():
                rel = os.path.relpath(image, folder)
                lines += [f"![{Path(image).stem}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(folder: Path, title: str, sections: list[Section]) -> Path:
    """Write ``folder/report.md`` (through a temporary file and a rename); returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.md"
    tmp = folder / ".report.md.tmp"
    tmp.write_text(render(title, sections, folder))
    os.replace(tmp, path)
    return path
