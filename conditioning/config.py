"""Text-conditioning config: which text encoder, which of its layers, and condition dropout."""

from __future__ import annotations

from dataclasses import dataclass

from ldm.config import ConfigError, check_choice

TEXT_ENCODER_KINDS = ("scratch", "clip", "openclip")
TEXT_LAYERS = ("last", "penultimate")


@dataclass
class TextEncoderConfig:
    """The text encoder that turns captions into the UNet's cross-attention context (B, L, D).

    Every kind ends up as a ``transformers.CLIPTextModel`` (OpenCLIP towers are converted), so the
    stage-2 export can save it as a diffusers pipeline's ``text_encoder/``.
    """

    kind: str = "scratch"  # scratch | clip | openclip
    name_or_path: str | None = (
        None  # clip: hub id or local folder (a CLIPTextModel or a pipeline); openclip: model name ("ViT-H-14")
    )
    pretrained: str | None = None  # openclip only: pretrained tag ("laion2b_s32b_b79k") or local weights file
    layer: str = "last"  # last | penultimate (SD 2: the last transformer layer is dropped)
    train: bool | None = None  # None: scratch trains, clip/openclip are frozen
    p_uncond: float = 0.1  # condition dropout: a caption becomes "" with this probability
    max_length: int = 77  # tokens per caption, start and end tokens included
    # scratch architecture (a small CLIP text transformer, random init)
    hidden_size: int = 128  # context width D
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512  # MLP width

    def __post_init__(self) -> None:
        check_choice("text.kind", self.kind, TEXT_ENCODER_KINDS)
        check_choice("text.layer", self.layer, TEXT_LAYERS)
        if self.kind in ("clip", "openclip") and not self.name_or_path:
            what = (
                "a hub id or a local folder"
                if self.kind == "clip"
                else "an OpenCLIP model name such as ViT-H-14"
            )
            raise ConfigError(f"text.kind={self.kind} needs text.name_or_path=... ({what})")
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
        if not 0.0 <= self.p_uncond < 1.0:
            raise ConfigError(f"config key 'text.p_uncond' is {self.p_uncond}; it must be in [0, 1)")
        if self.max_length < 2:
            raise ConfigError(
                f"config key 'text.max_length' is {self.max_length}; it must be >= 2 (start and end tokens)"
            )
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'text.{name}' is {getattr(self, name)}; it must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"config key 'text.hidden_size' is {self.hidden_size}; it must be a multiple of "
                f"text.num_heads={self.num_heads}"
            )

    @property
    def trainable(self) -> bool:
        """Whether the encoder's weights are optimized: ``train`` if set, else only a scratch encoder."""
        return self.train if self.train is not None else self.kind == "scratch"
