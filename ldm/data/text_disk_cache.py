"""The frozen text encoders' outputs on disk, one row per item, next to the latent cache.

    cache_dir/text-<key>-<items per shard>/shard-00000.safetensors ... index.json

With the text encoders frozen, each caption's conditioning (the context (L, D), and SDXL's pooled
embedding (P,)) is a function of the caption alone. In memory it is kept for at most 4,096 distinct
captions (``CaptionCache``); past that, every step encodes its captions again. This cache computes
every item's conditioning once, in the dtype the encoders run in, and a training step reads its rows
like the latents' (``os.pread``, nothing resident). The layout and the guarantees are the latent
cache's (``ldm.data.disk_cache``): shards of S items, process r writing shards r, r + P, ...,
each atomically, and the index last. Within a shard, each distinct caption is encoded once.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ldm.data.disk_cache import INDEX, ShardReader, build_shards

FORMAT = "ldm text shards 1"
PREFIX = "text."  # the batch keys of the cached conditioning: "text.<its key>"
ENCODE_BATCH = 256  # distinct captions per encoder call


def text_columns(encode: Callable[[list[str]], dict[str, Tensor]], captions: list[str]) -> dict[str, Tensor]:
    """``encode``'s outputs for ``captions``, one row per caption, each distinct caption encoded once."""
    distinct = list(dict.fromkeys(captions))
    parts: list[dict[str, Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(distinct), ENCODE_BATCH):
            parts.append(
                {k: v.detach().cpu() for k, v in encode(distinct[start : start + ENCODE_BATCH]).items()}
            )
    values = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    where = {c: i for i, c in enumerate(distinct)}
    rows = torch.tensor([where[c] for c in captions], dtype=torch.long)
    return {k: v[rows].contiguous() for k, v in values.items()}


def build_text_cache(
    encode: Callable[[list[str]], dict[str, Tensor]],
    captions: Sequence[str],
    folder: str | Path,
    key: str,
    per_shard: int,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """The conditioning of ``captions[i]`` for every i, in the shards ``folder`` lacks (this process's
    share), then the index. Every process calls ``barrier`` twice (see ``build_shards``)."""

    def columns(s: int, items: range, count: int) -> dict[str, Tensor]:
        return text_columns(encode, [captions[i] for i in items])

    return build_shards(folder, len(captions), per_shard, columns, key, FORMAT, rank, world_size, barrier)


class DiskTextColumns:
    """Item i's cached conditioning: {"text.<key>": tensor} read from its shard."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX).read_text())
        self.length = index["items"]
        self.starts = [s["start"] for s in index["shards"]]
        self.readers = [ShardReader(self.folder / s["file"]) for s in index["shards"]]

    def __len__(self) -> int:
        return self.length

    def __call__(self, index: int) -> dict[str, Tensor]:
        shard = bisect.bisect_right(self.starts, index) - 1
        reader, i = self.readers[shard], index - self.starts[shard]
        return {PREFIX + name: reader.tensor_rows(name, i, i + 1)[0] for name in reader.columns}

    def nbytes(self) -> int:
        return sum(r.path.stat().st_size for r in self.readers)
