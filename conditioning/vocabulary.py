"""Which tokens a text encoder was trained on, kept beside its weights.

A text encoder trained from scratch (``text.kind=scratch``) knows only the words of its training
captions: every other token id reaches it as a random, untrained embedding. The trainer records the
ids it saw in ``text_encoder/trained_tokens.json``, so that a later fine-tune can measure how much
of its captions the encoder has never seen (``unseen_token_share``) and say what to do. Pretrained
encoders (CLIP, OpenCLIP) have no such file: they have seen the whole vocabulary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

TRAINED_TOKENS_FILE = "trained_tokens.json"


def save_trained_tokens(folder: str | Path, ids: Iterable[int]) -> Path:
    """Write ``folder/trained_tokens.json`` (sorted ids), atomically."""
    path = Path(folder) / TRAINED_TOKENS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"token_ids": sorted({int(i) for i in ids})}))
    os.replace(tmp, path)
    return path


def load_trained_tokens(folder: str | Path) -> set[int] | None:
    """The ids a text encoder saw in training, or None when the folder has no record."""
    path = Path(folder) / TRAINED_TOKENS_FILE
    if not path.exists():
        return None
    return set(json.loads(path.read_text())["token_ids"])


def caption_token_ids(input_ids: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    """The word tokens of tokenized captions (B, L): every id but the special ones (start, end, padding)."""
    ids = input_ids.flatten()
    special = torch.tensor(sorted({int(i) for i in special_ids if i is not None}), dtype=ids.dtype)
    return ids[~torch.isin(ids, special)]


def unseen_token_share(input_ids: torch.Tensor, special_ids: Iterable[int], trained: set[int]) -> float:
    """Share of the word tokens of captions (B, L) that are not in ``trained``: 0 when all were seen."""
    words = caption_token_ids(input_ids, special_ids)
    if words.numel() == 0:
        return 0.0
    seen = torch.isin(words, torch.tensor(sorted(trained), dtype=words.dtype))
    return float(1.0 - seen.float().mean())
