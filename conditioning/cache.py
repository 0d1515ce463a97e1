"""caption -> condition tensors, computed once per distinct caption."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class CaptionCache:
    """caption -> the tensors of ``fn``, computed once per distinct caption (at most ``max_items`` kept).

    ``fn`` maps a list of captions to a dict of batch-first tensors; a call returns the same dict for
    its captions, rows stacked in order. Used for the token ids of every caption, and for the
    conditioning of a frozen conditioner.
    """

    def __init__(self, fn: Callable[[list[str]], dict[str, Tensor]], max_items: int = 4096):
        self._fn = fn
        self._store: dict[str, dict[str, Tensor]] = {}
        self.max_items = max_items

    def __call__(self, captions: list[str]) -> dict[str, Tensor]:
        todo = list(dict.fromkeys(c for c in captions if c not in self._store))
        fresh: dict[str, dict[str, Tensor]] = {}
        if todo:
            with torch.no_grad():
                values = self._fn(todo)
            fresh = {c: {k: v[i] for k, v in values.items()} for i, c in enumerate(todo)}
            if len(self._store) + len(fresh) <= self.max_items:
                self._store.update(fresh)
        rows = [self._store[c] if c in self._store else fresh[c] for c in captions]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # (B, ...) each

    def __len__(self) -> int:
        return len(self._store)
