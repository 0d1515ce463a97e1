"""Text-conditioning config: which text encoder, which of its layers, and condition dropout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ldm.core.config import ConfigError, check_bounds, check_choice

TEXT_LAYERS = ("last", "penultimate")


@dataclass
class TextEncoderConfig:
    """The text encoder that turns captions into the UNet's cross-attention context (B, L, D).

    Every kind ends up as a ``transformers.CLIPTextModel`` (OpenCLIP towers are converted), so the
    stage-2 export can save it as a diffusers pipeline's ``text_encoder/``.
    """

    # the names of conditioning.encoders.TEXT_ENCODERS: scratch | clip | openclip
    kind: str = "scratch"
    name_or_path: str | None = (
        None  # clip: hub id or local folder (a CLIPTextModel or a pipeline); openclip: model name ("ViT-H-14")
    )
    pretrained: str | None = None  # openclip only: pretrained tag ("laion2b_s32b_b79k") or local weights file
    layer: str = "last"  # last | penultimate (SD 2: the last transformer layer is dropped)
    train: bool | None = None  # None: scratch trains, clip/openclip are frozen
    p_uncond: float = 0.1  # condition dropout: a caption becomes "" with this probability
    max_length: int = 77  # tokens per caption, start and end tokens included
    # a CLIPTextModelWithProjection (its pooled, projected embedding: SDXL's second encoder)
    with_projection: bool = False
    # scratch architecture (a small CLIP text transformer, random init)
    hidden_size: int = 128  # context width D
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512  # MLP width

    # p_uncond = 1 would drop every caption; max_length counts the start and end tokens
    BOUNDS: ClassVar[dict[str, str]] = {
        "p_uncond": "[0, 1)",
        "max_length": ">= 2",
        "hidden_size": ">= 1",
        "num_layers": ">= 1",
        "num_heads": ">= 1",
        "intermediate_size": ">= 1",
    }

    def __post_init__(self) -> None:
        # text.kind is checked against conditioning.encoders.TEXT_ENCODERS, the registry of kinds
        check_choice("text.layer", self.layer, TEXT_LAYERS)
        check_bounds("text", self)
        if self.kind in ("clip", "openclip") and not self.name_or_path:
            what = (
                "a hub id or a local folder"
                if self.kind == "clip"
                else "an OpenCLIP model name such as ViT-H-14"
            )
            raise ConfigError(f"text.kind={self.kind} needs text.name_or_path=... ({what})")
        if self.with_projection and self.kind == "openclip":
            raise ConfigError("text.with_projection=true applies to scratch and clip encoders, not openclip")
        if self.pretrained is not None and self.kind != "openclip":
            raise ConfigError(
                f"config key 'text.pretrained' is only used with text.kind=openclip (kind is {self.kind!r}); "
                "for clip put the folder or hub id in text.name_or_path"
            )
        if self.layer == "penultimate" and self.kind == "scratch":
            raise ConfigError(
                "text.layer=penultimate applies to pretrained encoders (clip | openclip); a scratch encoder "
                "learns to use its own last layer: set text.num_layers instead"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"config key 'text.hidden_size' is {self.hidden_size}; it must be a multiple of "
                f"text.num_heads={self.num_heads}"
            )

    @property
    def trainable(self) -> bool:
        """Whether the encoder's weights are optimized: ``train`` if set, else only a scratch encoder."""
        return self.train if self.train is not None else self.kind == "scratch"


@dataclass
class NewTokensConfig:
    """Textual inversion (Gal et al. 2022): new tokens whose embedding rows train (``conditioning.new_tokens``).

    Alone (``lora.rank=0``) nothing else trains: the UNet and the text encoders stay frozen. With
    ``lora.rank`` > 0 the rows and the LoRA train together: pivotal tuning. SDXL: the tokens go into
    both tokenizers and both encoders. Saved to ``embeddings/`` as diffusers' ``load_textual_inversion``
    reads them.
    """

    tokens: list[str] = field(default_factory=list)  # e.g. ["<my-cat>"]: lower case, not in the vocabulary
    init: list[str] = field(default_factory=list)  # one word per token: its embedding starts the token's rows
    vectors: int = 1  # embedding rows per token (diffusers' num_vectors): more rows, more capacity
    lr: float | None = None  # the rows' learning rate; None: train.lr (no weight decay on them)
    # also export model/ with the tokens in its tokenizer(s) and text encoder(s) (and, with LoRA and
    # lora.merge=true, the adapters merged)
    merge: bool = False

    BOUNDS: ClassVar[dict[str, str]] = {"vectors": ">= 1", "lr": "> 0"}

    def __post_init__(self) -> None:
        check_bounds("ti", self)
        if self.tokens and len(self.init) != len(self.tokens):
            raise ConfigError(
                f"ti.tokens has {len(self.tokens)} token(s) and ti.init {len(self.init)} word(s): give one "
                "init word per token (a word close to the concept, e.g. ti.init=[cat] for ti.tokens=['<my-cat>'])"
            )
