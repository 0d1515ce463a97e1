"""The latent cache on disk, for datasets bigger than memory: shards written by every process, read by offset.

    cache_dir/latents-<key>/shard-00000.safetensors ... index.json

Shard s holds items [s S, (s + 1) S) of the dataset (S = ``shard_items``, fixed by the config, so the
shards do not depend on the process count). Process r encodes shards r, r + P, ... and writes each
through a temporary file and a rename, so a shard that exists is complete: a killed run's rerun
encodes only the missing ones, and the cache equals an uninterrupted one. The index, written last by
the main process, marks the cache complete.

Each shard is a safetensors file of flat columns: ``latents`` (float32: each item's posterior mean
then std, flattened), ``offsets`` (N + 1, into ``latents``), ``shapes`` (N, 3), the micro-conditioning
(N, 2) each, ``caption_bytes`` (UTF-8) and ``caption_offsets`` (N + 1), and with masked loss ``mask``
(float32, each item's weights at its latents' size) and ``mask_offsets`` (N + 1). Items of any shape
(aspect-ratio buckets) fit. Reading an item parses nothing: the header is read once per shard, and each column's
rows are read with ``os.pread`` at their byte offsets. Nothing is memory-mapped, so the pages stay in
the kernel's page cache, not in the process's resident memory, which does not grow with the dataset.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset, Subset

from ldm.core.errors import DataError
from ldm.core.io import umask_permissions, write_json
from ldm.data.cache import MICRO_KEYS, encode_items
from ldm.data.transforms import split_key

logger = logging.getLogger("ldm")

INDEX = "index.json"
FORMAT = "ldm latent shards 1"
SHARD_BYTES = 256 * 2**20  # about this many bytes of posteriors per shard
MAX_SHARD_ITEMS = 65_536
MAX_OPEN = 256  # shard files a process keeps open at once (the least recently opened are closed)
OPEN: list[ShardReader] = []  # this process's open readers, oldest first
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "U8": np.uint8}


def shard_items(item_bytes: int) -> int:
    """Items per shard for posteriors of about ``item_bytes`` each (mean and std)."""
    return max(1, min(MAX_SHARD_ITEMS, SHARD_BYTES // max(1, item_bytes)))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def shard_columns(mean, std, captions: list[str], micro: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One shard's columns from ``encode_items``' output (stacked tensors or per-item lists)."""
    pieces, offsets, shapes = [], [0], []
    for m, s in zip(mean, std, strict=True):
        pieces += [m.reshape(-1), s.reshape(-1)]
        offsets.append(offsets[-1] + 2 * m.numel())
        shapes.append(list(m.shape))
    text = [c.encode("utf-8", "surrogatepass") for c in captions]  # (any str, as the in-memory cache)
    bounds = np.cumsum([0, *map(len, text)])
    columns = {
        "latents": torch.cat(pieces).float() if pieces else torch.zeros(0),
        "offsets": torch.tensor(offsets, dtype=torch.long),
        "shapes": torch.tensor(shapes, dtype=torch.long).reshape(-1, 3),
        "caption_bytes": torch.frombuffer(bytearray(b"".join(text) or b"\0"), dtype=torch.uint8),
        "caption_offsets": torch.from_numpy(bounds.astype(np.int64)),
    }
    if "mask" in micro:  # masked loss: each item's weights at its latents' size, flat (float32)
        masks = [m.reshape(-1).float() for m in micro["mask"]]
        columns["mask"] = torch.cat(masks) if masks else torch.zeros(0)
        columns["mask_offsets"] = torch.tensor(np.cumsum([0, *(m.numel() for m in masks)]), dtype=torch.long)
    return columns | {k: micro[k].long().contiguous() for k in MICRO_KEYS}


def write_shard(path: Path, columns: dict[str, torch.Tensor]) -> None:
    """``columns`` to ``path`` through a temporary file of this process and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in columns.items()}, str(tmp))
    umask_permissions(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the data on the disk before the name says the shard is there
    finally:
        os.close(fd)
    os.replace(tmp, path)


class ShardReader:
    """Rows of a shard's columns by byte offset (``os.pread``), from the safetensors header."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        base = 8 + size
        self.columns = {
            name: (DTYPES[h["dtype"]], h["shape"], base + h["data_offsets"][0]) for name, h in header.items()
        }
        self.bfloat16 = {name for name, h in header.items() if h["dtype"] == "BF16"}
        self.fd: int | None = None
        self.pid = -1

    def _fd(self) -> int:
        if self.fd is None or self.pid != os.getpid():  # a DataLoader worker opens its own
            self.fd, self.pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), os.getpid()
            OPEN.append(self)
            while len(OPEN) > MAX_OPEN:  # keep the descriptors under the usual limit of 1024
                OPEN.pop(0).close()
        return self.fd

    def close(self) -> None:
        if self.fd is not None and self.pid == os.getpid():
            os.close(self.fd)
        self.fd = None

    def _read(self, size: int, offset: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self._fd(), size, offset)
        os.lseek(self._fd(), offset, os.SEEK_SET)  # Windows: no pread (one reader per process)
        return os.read(self._fd(), size)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of column ``name`` (its first dimension)."""
        dtype, shape, offset = self.columns[name]
        row = math.prod(shape[1:]) * np.dtype(dtype).itemsize
        data = self._read((stop - start) * row, offset + start * row)
        if len(data) != (stop - start) * row:
            raise DataError(
                f"latent cache shard {self.path} is cut short: delete it and run again to re-encode it"
            )
        return np.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:])

    def tensor_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of column ``name`` as a tensor of its own dtype (bfloat16 included)."""
        rows = torch.from_numpy(self.rows(name, start, stop).copy())
        return rows.view(torch.bfloat16) if name in self.bfloat16 else rows

    def __getstate__(self) -> dict[str, Any]:  # pickled into worker processes: no descriptor
        return {**self.__dict__, "fd": None, "pid": -1}

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            self.close()


class CaptionColumn(Sequence):
    """The cache's captions as a read-on-demand sequence (for the token record)."""

    def __init__(self, dataset: DiskLatentDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)  # (ends iteration)
        return self.dataset.caption(index)


class DiskLatentDataset(Dataset):
    """Items of a complete disk cache, as ``LatentDataset`` gives them: {"mean", "std", "caption",
    "original_size", "crop_top_left"} (and ``text.*`` when ``text`` is set), each read from its shard
    when asked for."""

    def __init__(self, folder: str | Path, bucket_of: list[int] | None = None):
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX).read_text())
        self.length = index["items"]
        self.starts = [s["start"] for s in index["shards"]]
        self.readers = [ShardReader(self.folder / s["file"]) for s in index["shards"]]
        self.bucket_of = bucket_of
        self.captions = CaptionColumn(self)
        self.text: Callable[[int], dict[str, torch.Tensor]] | None = None  # item -> cached conditioning

    def __len__(self) -> int:
        return self.length

    def _locate(self, index: int) -> tuple[ShardReader, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        return self.readers[shard], index - self.starts[shard]

    def caption(self, index: int) -> str:
        reader, i = self._locate(index)
        lo, hi = reader.rows("caption_offsets", i, i + 2)
        return reader.rows("caption_bytes", int(lo), int(hi)).tobytes().decode("utf-8", "surrogatepass")

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, _ = split_key(key, len(self))
        reader, i = self._locate(index)
        lo, hi = (int(v) for v in reader.rows("offsets", i, i + 2))
        shape = tuple(int(v) for v in reader.rows("shapes", i, i + 1)[0])
        flat = torch.from_numpy(reader.rows("latents", lo, hi).copy())  # (2 C h w,)
        mean, std = flat.view(2, *shape)
        item = {"mean": mean, "std": std, "caption": self.caption(index)}
        if self.text is not None:  # the frozen text encoders' outputs (``ldm.data.text_disk_cache``)
            item |= self.text(index)
        if "mask" in reader.columns:  # masked loss: (1, h, w)
            m_lo, m_hi = (int(v) for v in reader.rows("mask_offsets", i, i + 2))
            item["mask"] = torch.from_numpy(reader.rows("mask", m_lo, m_hi).copy()).view(1, *shape[1:])
        return item | {k: torch.from_numpy(reader.rows(k, i, i + 1)[0].copy()) for k in MICRO_KEYS}

    def nbytes(self) -> int:
        return sum(r.path.stat().st_size for r in self.readers)


def shard_is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole shard: its header parses and the file is as long as it says (a
    shard cut short by a crash before the data reached the disk is encoded again)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return False
    header.pop("__metadata__", None)
    end = max((h["data_offsets"][1] for h in header.values()), default=0)
    return path.stat().st_size == 8 + size + end


def _remove_dead_temporaries(folder: Path) -> None:
    """Temporary shards of processes of this machine that no longer run (a killed run's)."""
    for tmp in folder.glob(".shard-*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)  # alive (ours or another job's): leave it
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            continue


def build_disk_cache(
    vae,
    dataset: Dataset,
    batch_size: int,
    folder: str | Path,
    key: str,
    per_shard: int,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Encode the shards of ``dataset`` that ``folder`` lacks (this process: shards rank, rank + P, ...),
    then the main process writes the index. Returns ``folder``; a complete cache is left as it is.

    Every process calls ``barrier`` twice, whatever it finds, and every process raises the same
    error when the cache is still incomplete after them (no process is left waiting)."""
    bucketed = getattr(dataset, "bucket_of", None) is not None

    def columns(s: int, items: range, count: int) -> dict[str, torch.Tensor]:
        mean, std, captions, micro = encode_items(
            vae,
            Subset(dataset, items),
            batch_size,
            f"caching latents to disk (shard {s + 1}/{count})",
            bucketed,
        )
        return shard_columns(mean, std, captions, micro)

    return build_shards(folder, len(dataset), per_shard, columns, key, FORMAT, rank, world_size, barrier)


def _write_index(folder: Path, entries: list[dict], key: str, fmt: str, per_shard: int) -> None:
    """The index of a cache whose shards ``entries`` are all there (main process); it marks it complete."""
    items = sum(e["items"] for e in entries)
    meta = {"format": fmt, "key": key, "items": items, "shard_items": per_shard, "shards": entries}
    write_json(folder / INDEX, meta)
    _remove_dead_temporaries(folder)
    logger.info("disk cache: wrote %d items in %d shards to %s", items, len(entries), folder)


def _not_shared(folder: Path, what: str) -> DataError:
    return DataError(
        f"disk cache {folder}: {what}: cache_dir must be a folder every process sees (a shared filesystem "
        "across machines), or precompute the cache with ldm-cache and copy it to each machine"
    )


def build_shards(
    folder: str | Path,
    n: int,
    per_shard: int,
    columns: Callable[[int, range, int], dict[str, torch.Tensor]],
    key: str,
    fmt: str,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """The shards of items [0, n) that ``folder`` lacks, this process's share (shards rank, rank + P,
    ...): shard s is ``columns(s, its items, shard count)``, written atomically; then the index (format
    ``fmt``), by the main process once every shard is there. Every process calls ``barrier`` twice and
    raises the same error when shards are missing after them."""
    folder = Path(folder)
    shards = [range(s, min(n, s + per_shard)) for s in range(0, n, per_shard)]
    index = folder / INDEX
    if not index.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        todo = [
            s for s in range(rank, len(shards), world_size) if not shard_is_complete(folder / shard_name(s))
        ]
        for s in todo:
            write_shard(folder / shard_name(s), columns(s, shards[s], len(shards)))
    barrier()
    entries = [{"file": shard_name(s), "start": r.start, "items": len(r)} for s, r in enumerate(shards)]
    if rank == 0 and not index.is_file():
        if all(shard_is_complete(folder / e["file"]) for e in entries):
            _write_index(folder, entries, key, fmt, per_shard)
    barrier()
    if not index.is_file():
        missing = [e["file"] for e in entries if not (folder / e["file"]).is_file()]
        raise _not_shared(folder, f"shards missing after encoding ({', '.join(missing[:3]) or 'none here'})")
    meta = json.loads(index.read_text())
    if meta.get("format") != fmt or meta.get("items") != n:
        raise DataError(
            f"disk cache {folder} holds {meta.get('items')} items in format {meta.get('format')!r}, "
            f"the data has {n}: delete the folder to rebuild it"
        )
    return folder


def build_stream_cache(
    vae,
    stream,
    batch_size: int,
    folder: str | Path,
    key: str,
    per_shard: int,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """A streamed dataset (``HFStreamingDataset``: ``rank``, ``world_size``, ``skip``, ``set_epoch``)
    cached shard by shard, its length unknown until it ends. Process r reads its part of the stream
    (epoch 0) and writes its c-th run of ``per_shard`` items as shard c P + r, encoding a batch at a
    time (only ``batch_size`` images in memory); when its part ends it writes ``done-r-of-P``. Each
    shard records the stream's rows read through its last item (``stream_end``: undecodable rows
    included, from the items' ``stream_position``), and a rerun skips the shards a process has
    (``skip``: those rows) and goes on from there. Once
    every process is done, the main process writes the index (the shards in order). The shards depend
    on P, which the folder's key holds. Every process calls ``barrier`` twice."""
    folder = Path(folder)
    index = folder / INDEX
    marker = folder / f"done-{rank:05d}-of-{world_size:05d}"
    if not index.is_file() and not marker.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        chunk, skip = 0, 0
        while shard_is_complete(folder / shard_name(chunk * world_size + rank)):
            skip = int(
                ShardReader(folder / shard_name(chunk * world_size + rank)).rows("stream_end", 0, 1)[0]
            )
            chunk += 1
        stream.rank, stream.world_size, stream.skip = rank, world_size, skip
        stream.set_epoch(0)
        parts: list[tuple] = []  # this shard's encoded batches
        pending: list[dict] = []  # images not yet encoded (< batch_size)

        def encode_pending() -> None:
            if pending:
                parts.append(encode_items(vae, pending, batch_size, "caching a stream to disk"))
                pending.clear()

        def flush() -> None:
            encode_pending()
            if parts:
                mean = torch.cat([p[0] for p in parts])
                std = torch.cat([p[1] for p in parts])
                captions = [c for p in parts for c in p[2]]
                micro = {k: torch.cat([p[3][k] for p in parts]) for k in MICRO_KEYS}
                columns = shard_columns(mean, std, captions, micro)
                columns["stream_end"] = torch.tensor([end], dtype=torch.long)  # the stream's rows read
                write_shard(folder / shard_name(chunk * world_size + rank), columns)
                parts.clear()

        count, end = 0, skip
        for item in stream:  # rows that fail to decode are skipped (with a warning) by the stream
            end = int(item.pop("stream_position", end)) + 1
            pending.append(item)
            count += 1
            if len(pending) == batch_size:
                encode_pending()
            if count == per_shard:
                flush()
                chunk, count = chunk + 1, 0
        flush()
        write_json(marker, {"shards": chunk + (count > 0)})
    barrier()
    if rank == 0 and not index.is_file():
        done = all((folder / f"done-{r:05d}-of-{world_size:05d}").is_file() for r in range(world_size))
        shards = sorted(int(p.name[6:11]) for p in folder.glob("shard-*.safetensors"))
        if done and all(shard_is_complete(folder / shard_name(s)) for s in shards):
            entries, start = [], 0
            for s in shards:
                items = ShardReader(folder / shard_name(s)).columns["shapes"][1][0]
                entries.append({"file": shard_name(s), "start": start, "items": items})
                start += items
            _write_index(folder, entries, key, FORMAT, per_shard)
    barrier()
    if not index.is_file():
        raise _not_shared(folder, "a process's part of the stream is missing after caching")
    if json.loads(index.read_text())["items"] == 0:
        raise DataError(f"disk cache {folder}: the stream yielded no items; check data.path and its columns")
    return folder
