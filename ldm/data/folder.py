"""A folder of images with captions, in the ``datasets`` imagefolder layout.

Images are found recursively (hidden files and folders are skipped). Captions come
from ``metadata.jsonl`` files (``{"file_name": ..., "text": ...}`` per line, the name
relative to the jsonl's folder; one may sit in the root and in any subfolder), else
from a ``.txt`` file of the same name next to the image, else "".
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.core.errors import DataError
from ldm.data.masks import is_mask_file, load_mask
from ldm.data.transforms import MIN_IMAGE_SIDE, ImageTransform, check_pixels, load_rgb, split_key

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
METADATA_FILE = "metadata.jsonl"
SCAN_THREADS = 8  # header reads in flight while scanning (helps on network file systems)


class FolderItem(NamedTuple):
    """One readable image of a folder, its caption and its (width, height)."""

    path: Path
    caption: str
    size: tuple[int, int] | None = None


def _walk_images(root: Path) -> tuple[list[Path], list[Path]]:
    """(image files, metadata.jsonl files) under ``root``, sorted, hidden entries skipped."""
    images: list[Path] = []
    metadata: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if name == METADATA_FILE:
                metadata.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(path):  # masks: no images
                images.append(path)
    return sorted(images), sorted(metadata)


def image_files(root: str | Path) -> list[Path]:
    """The image files under ``root`` (mask files and hidden entries left out), sorted; [] where
    ``root`` does not exist yet (a regularization folder before its class images are drawn)."""
    return _walk_images(Path(root))[0] if Path(root).is_dir() else []


def _metadata_path(jsonl: Path, file_name: object, line_no: int) -> Path:
    """The image path a metadata line names; refuses names that leave the jsonl's folder."""
    if not isinstance(file_name, str) or not file_name:
        raise DataError(f"{jsonl}, line {line_no}: 'file_name' must be a non-empty string, not {file_name!r}")
    name = PurePosixPath(file_name.replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts or Path(file_name).is_absolute():
        raise DataError(
            f"{jsonl}, line {line_no}: file_name {file_name!r} points outside the dataset folder; "
            "names must be relative to the folder of metadata.jsonl, without '..'"
        )
    return Path(os.path.normpath(jsonl.parent.joinpath(*name.parts)))


def read_metadata(jsonl: Path, caption_column: str = "text") -> dict[Path, str | None]:
    """``{image path: caption}`` from one metadata.jsonl (caption None where the line has none).

    Raises ``DataError`` naming the file and line for a line that is not a JSON object
    with a ``file_name``, or whose ``file_name`` escapes the folder.
    """
    captions: dict[Path, str | None] = {}
    with open(jsonl, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{jsonl}, line {line_no}: not UTF-8 ({err.reason}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{jsonl}, line {line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or "file_name" not in record:
                raise DataError(f"{jsonl}, line {line_no}: expected a JSON object with a 'file_name' key")
            text = record.get(caption_column)
            path = _metadata_path(jsonl, record["file_name"], line_no)
            captions[path] = None if text is None else str(text)
    return captions


def _readable(path: Path) -> str | tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied) if PIL can read ``path``'s header,
    else why not (the file is not decoded)."""
    try:
        with Image.open(path) as image:  # parses the header only; pixels are decoded on first use
            w, h = image.size
            check_pixels(w, h, MIN_IMAGE_SIDE)
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that turn 90 degrees
                w, h = h, w
    except Exception as err:  # PIL plugins raise many kinds of errors for malformed files
        return f"{type(err).__name__}: {err}"
    return w, h


def scan_folder(
    root: str | Path, caption_column: str = "text", empty_caption: str | None = None
) -> list[FolderItem]:
    """Every readable image under ``root`` with its caption, sorted by path.

    Unreadable or unusable files (corrupt, zero bytes, not an image, a side under 8 px, a
    decompression bomb) are skipped with one warning giving their count; images without a
    caption, or with an empty one, get "" (trained as unconditional) with one warning giving
    their count, or ``empty_caption`` where given. Raises ``DataError`` for a missing or empty
    folder or a broken metadata.jsonl.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no image folder at {root}: data.path must be a directory of images")
    images, metadata_files = _walk_images(root)
    if not images:
        raise DataError(
            f"no images found under {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, any case); "
            "set data.path to the folder that holds them"
        )

    metadata: dict[Path, str | None] = {}
    for jsonl in metadata_files:
        metadata.update(read_metadata(jsonl, caption_column))
    found = {Path(os.path.normpath(p)) for p in images}
    unmatched = [name for name in metadata if name not in found]
    if unmatched:
        logger.warning(
            "%d file(s) named in %s under %s are not images found there, e.g. %s",
            len(unmatched), METADATA_FILE, root, ", ".join(str(p) for p in unmatched[:5]),
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        problems = list(pool.map(_readable, images))
    skipped = [(p, why) for p, why in zip(images, problems, strict=True) if isinstance(why, str)]
    if skipped:
        logger.warning(
            "skipped %d unreadable or unusable image file(s) under %s: %s%s",
            len(skipped), root, "; ".join(f"{p} ({why})" for p, why in skipped[:5]),
            ", ..." if len(skipped) > 5 else "",
        )  # fmt: skip

    items: list[FolderItem] = []
    missing = 0
    not_utf8: list[Path] = []
    for path, why in zip(images, problems, strict=True):
        if isinstance(why, str):
            continue
        text = metadata.get(Path(os.path.normpath(path)))
        if text is None:
            sidecar = path.with_suffix(".txt")
            if sidecar.is_file():
                raw = sidecar.read_bytes()
                try:
                    text = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    text = raw.decode("utf-8", errors="replace").strip()
                    not_utf8.append(sidecar)
        if not text:
            missing += 1
        items.append(FolderItem(path, text or "", why))
    if not items:
        raise DataError(
            f"none of the {len(images)} image files under {root} could be read (the warning above says why)"
        )
    if not_utf8:
        logger.warning(
            "%d caption file(s) under %s are not UTF-8; their undecodable bytes became U+FFFD, e.g. %s",
            len(not_utf8), root, ", ".join(str(p) for p in not_utf8[:3]),
        )  # fmt: skip
    if missing and empty_caption is not None:  # (a regularization source: its class prompt)
        items = [it if it.caption else it._replace(caption=empty_caption) for it in items]
        logger.info(
            "%d of %d images under %s have no caption: captioned %r", missing, len(items), root, empty_caption
        )
    elif missing:
        logger.warning(
            "%d of %d images under %s have no caption or an empty one (no %s entry with %r, no .txt "
            "file); they are trained with the empty caption",
            missing, len(items), root, METADATA_FILE, caption_column,
        )  # fmt: skip
    return items


class ImageFolderDataset(Dataset):
    """Images and captions from a folder, as tensors.

    ``dataset[i]`` or ``dataset[(i, aug_seed)]`` -> ``{"pixel_values": float32 (3, R, R)
    in [-1, 1], "caption": str}``. ``items`` (from ``scan_folder``) gives the items
    directly, e.g. a train or validation subset, instead of scanning ``root``. An image
    that fails to decode is reported once and replaced by the next readable item.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        crop: str = "center",
        flip: bool = False,
        items: Sequence[FolderItem] | None = None,
        caption_column: str = "text",
        masks: bool = False,
    ) -> None:
        self.root = Path(root)
        self.masks = masks  # items carry "mask" (1, R, R): data.masked_loss (ldm.data.masks)
        self.items: list[FolderItem] = list(items) if items is not None else scan_folder(root, caption_column)
        self.transform = ImageTransform(resolution, crop, flip)
        self.target_sizes: list[tuple[int, int]] | None = None  # (w, h) per item when bucketed
        self._broken: set[int] = set()  # items that failed to decode in this process

    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every item's image, from the scan or its header."""
        sizes = [it.size if it.size is not None else _readable(it.path) for it in self.items]
        return [s if isinstance(s, tuple) else (1, 1) for s in sizes]  # unreadable: decoding reports it

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={str(self.root)!r}, items={len(self)}, transform={self.transform})"

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | str]:
        index, generator = split_key(key, len(self.items))
        for offset in range(len(self.items)):
            i = (index + offset) % len(self.items)
            if i in self._broken:
                continue
            path, text = self.items[i][:2]
            mask = None
            try:
                image = load_rgb(path)
                if self.masks:  # the mask file's, the alpha channel's, or all ones
                    mask = load_mask(path, IMAGE_EXTENSIONS) or Image.new("L", image.size, 255)
            except Exception as err:  # any decode failure: report it, then use the next item
                self._broken.add(i)
                logger.warning("cannot decode %s or its mask (%r); using the next image instead", path, err)
                continue
            size = self.target_sizes[index] if self.target_sizes is not None else None
            pixels, micro = self.transform.apply(image, generator, size, mask)
            return {"pixel_values": pixels, "caption": text, **micro}
        raise DataError(f"none of the {len(self.items)} images of {self.root} could be decoded")


def scan_csv(
    csv_path: str | Path, image_column: str = "image", caption_column: str = "text"
) -> list[FolderItem]:
    """Every readable image a CSV names (paths relative to the CSV's folder) with its caption.

    Unreadable or missing files are skipped with one warning giving their count; raises
    ``DataError`` for a missing file or column.
    """
    import csv

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(
            f"no CSV file at {csv_path}: data.path must name a .csv with image and caption columns"
        )
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in (image_column, caption_column) if c not in header]
        if missing:
            raise DataError(
                f"{csv_path} has no column {', '.join(repr(c) for c in missing)}; columns: {', '.join(header)} "
                "(set data.image_column / data.caption_column)"
            )
        rows = [(r[image_column], r[caption_column] or "") for r in reader]
    paths = [Path(name) if Path(name).is_absolute() else csv_path.parent / name for name, _ in rows]
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        found = list(
            pool.map(lambda p: _readable(p) if p.is_file() else "FileNotFoundError: no such file", paths)
        )
    items = [
        FolderItem(p, text, size)
        for p, (_, text), size in zip(paths, rows, found, strict=True)
        if isinstance(size, tuple)
    ]
    skipped = [(p, why) for p, why in zip(paths, found, strict=True) if isinstance(why, str)]
    if skipped:
        logger.warning(
            "skipped %d of %d rows of %s whose image cannot be read: %s%s",
            len(skipped), len(rows), csv_path, "; ".join(f"{p} ({why})" for p, why in skipped[:5]),
            ", ..." if len(skipped) > 5 else "",
        )  # fmt: skip
    if not items:
        raise DataError(
            f"none of the {len(rows)} images named in {csv_path} could be read (paths are relative to the "
            "CSV's folder; the warning above says why)"
        )
    return items
