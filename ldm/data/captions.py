"""Caption controls for tag-style captions (``caption.*``), as kohya's sd-scripts names them.

    "<prefix> " + kept tags + shuffled, dropped-out rest + " <suffix>"

A caption is split on ``separator`` into tags. The first ``keep_tokens`` tags stay in place and are
never dropped (kohya's ``--keep_tokens``: a subject's name, a trigger word). Each other tag is dropped
with probability ``tag_dropout`` (``--caption_tag_dropout_rate``), and with ``shuffle_tags`` the rest
are put in random order (``--shuffle_caption``). ``prefix`` and ``suffix`` are added last, so they
are neither shuffled nor dropped. The draws are a caption's row of ``2 * MAX_TAGS`` uniforms from the
step's random stream (``StepRandom.rand_host_rows``): the same on any process count, and checkpointed,
so a resumed run transforms each caption as the uninterrupted run did. Tags past ``MAX_TAGS`` are
kept, in order, after the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ldm.core.config import SourceConfig, check_bounds
from ldm.core.errors import ConfigError

MAX_TAGS = 128  # tags per caption that the draws cover


@dataclass
class CaptionConfig:
    shuffle_tags: bool = False  # put the tags after the first keep_tokens in random order
    keep_tokens: int = 0  # leading tags kept in place and never dropped
    separator: str = ","  # what splits a caption into tags
    tag_dropout: float = 0.0  # the probability of dropping each tag after the first keep_tokens
    prefix: str = ""  # added before every training caption (a trigger word)
    suffix: str = ""  # added after every training caption

    BOUNDS: ClassVar[dict[str, str]] = {"keep_tokens": ">= 0", "tag_dropout": "[0, 1)"}

    def __post_init__(self) -> None:
        check_bounds("caption", self)
        if not self.separator:
            raise ConfigError("caption.separator is empty: give what splits tags (default ',')")

    @property
    def changes_captions(self) -> bool:
        return bool(self.shuffle_tags or self.tag_dropout or self.prefix or self.suffix)

    @property
    def draws(self) -> bool:
        """Whether the transform needs random draws (shuffle or dropout)."""
        return bool(self.shuffle_tags or self.tag_dropout)


def transform_caption(caption: str, cfg: CaptionConfig, uniforms: torch.Tensor | None) -> str:
    """``caption`` after the controls of ``cfg``; ``uniforms``: (2 MAX_TAGS,) U[0, 1) draws (None when
    ``cfg.draws`` is false)."""
    if cfg.draws and caption:
        tags = [t for t in (t.strip() for t in caption.split(cfg.separator)) if t]  # ("a,,b": 2 tags)
        kept, rest = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
        covered, beyond = rest[:MAX_TAGS], rest[MAX_TAGS:]
        values = uniforms.tolist()  # (one host read, not one per tag)
        drop, order = values[:MAX_TAGS], values[MAX_TAGS:]
        chosen = [i for i in range(len(covered)) if not drop[i] < cfg.tag_dropout]
        if cfg.shuffle_tags:
            chosen.sort(key=lambda i: order[i])
        joiner = cfg.separator.strip() + " " if cfg.separator.strip() else cfg.separator
        caption = joiner.join(t for t in [*kept, *(covered[i] for i in chosen), *beyond] if t)
    return " ".join(p for p in (cfg.prefix, caption, cfg.suffix) if p)


def transform_captions(
    captions: list[str], cfg: CaptionConfig | list[CaptionConfig], uniforms: torch.Tensor | None
) -> list[str]:
    """Each caption transformed with its row of ``uniforms`` ((B, 2 MAX_TAGS) or None), by ``cfg`` or
    by its own config (a list: one per caption, a concept dataset's sources)."""
    configs = cfg if isinstance(cfg, list) else [cfg] * len(captions)
    return [
        transform_caption(c, configs[i], None if uniforms is None else uniforms[i])
        for i, c in enumerate(captions)
    ]


def source_caption_configs(cfg: CaptionConfig, sources: list[SourceConfig]) -> list[CaptionConfig]:
    """The caption controls of each source of a concept dataset: a train source's are ``cfg`` with the
    source's prefix and suffix inside ``cfg``'s ("<cfg.prefix> <source prefix> caption <source suffix>
    <cfg.suffix>"); a regularization source's class prompt gets only its own prefix and suffix (the
    class images keep the base model's words: no trigger word, no tag controls)."""
    join = lambda *words: " ".join(w for w in words if w)  # noqa: E731
    return [
        dataclasses.replace(cfg, prefix=join(cfg.prefix, s.prefix), suffix=join(s.suffix, cfg.suffix))
        if s.role == "train"
        else CaptionConfig(prefix=s.prefix, suffix=s.suffix, separator=cfg.separator)
        for s in sources
    ]


def trigger_words(cfg: CaptionConfig):
    """caption -> caption with ``prefix`` and ``suffix`` only (no draws): what held-out captions get, so
    that the validation loss measures captions as training sees them (a trigger word, a new token);
    None without a prefix or suffix."""
    if not (cfg.prefix or cfg.suffix):
        return None
    fixed = dataclasses.replace(cfg, shuffle_tags=False, tag_dropout=0.0)
    return lambda caption: transform_caption(caption, fixed, None)
