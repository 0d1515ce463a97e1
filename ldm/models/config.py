"""Configs of the stage-2 networks: the denoising UNet and its LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ldm.core.config import ConfigError, check_bounds, check_choice

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "math")
LORA_FORMATS = ("diffusers", "kohya", "both")


@dataclass
class UNetConfig:
    """A diffusers ``UNet2DConditionModel``; ``cross_attention`` says which levels attend to the text."""

    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    cross_attention: list[bool] = field(default_factory=lambda: [False, True])  # per level, top to bottom
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    attention: str = "auto"  # auto | sdpa | xformers | math
    gradient_checkpointing: bool = False
    # attention heads per level (diffusers' attention_head_dim as a list; SDXL: [5, 10, 20]); None: attention_head_dim
    heads_per_level: list[int] | None = None
    transformer_layers_per_block: list[int] | None = None  # per level (SDXL: [1, 2, 10]); None: 1 each
    use_linear_projection: bool = False  # linear (not 1x1 conv) projections around attention, as SD 2 / SDXL
    addition_time_embed_dim: int = 256  # SDXL conditioner: width of each time id's Fourier embedding

    BOUNDS: ClassVar[dict[str, str]] = {
        "block_out_channels": ">= 1",
        "layers_per_block": ">= 1",
        "attention_head_dim": ">= 1",
        "norm_num_groups": ">= 1",
        "heads_per_level": ">= 1",
        "transformer_layers_per_block": ">= 1",
        "addition_time_embed_dim": ">= 2",
    }

    def __post_init__(self) -> None:
        check_choice("unet.attention", self.attention, ATTENTION_BACKENDS)
        check_bounds("unet", self)
        for key in ("heads_per_level", "transformer_layers_per_block"):
            value = getattr(self, key)
            if value is not None and len(value) != len(self.block_out_channels):
                raise ConfigError(
                    f"unet.{key} has {len(value)} entries and unet.block_out_channels {len(self.block_out_channels)}: "
                    "give one per level"
                )
        if self.addition_time_embed_dim % 2:
            raise ConfigError(
                f"unet.addition_time_embed_dim is {self.addition_time_embed_dim}; it must be even"
            )
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ConfigError(
                f"unet.cross_attention has {len(self.cross_attention)} entries and unet.block_out_channels "
                f"{len(self.block_out_channels)}: give one true/false per level"
            )


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) on the attention projections; rank 0 trains the full UNet instead.

    W x + (alpha / rank) B A x, with B = 0 at the start, so training starts from the pretrained model.
    """

    rank: int = 0  # 0: full fine-tuning
    # lora | dora (DoRA, Liu et al. 2024: the weight's direction adapted by B A and its norm by a
    # trained magnitude vector; peft's use_dora; saved in diffusers' format, which diffusers loads)
    # | loha (Hadamard product of two low-rank pairs) | lokr (Kronecker product): peft's LoHa and LoKr,
    # saved in peft's layout (lora/<model>/adapter_model.safetensors), which our pipeline loads
    kind: str = "lora"
    alpha: float | None = None  # scale numerator; None: alpha = rank (scale 1)
    # per module kind (peft's rank_pattern / alpha_pattern): a module-name pattern -> its rank / alpha,
    # e.g. {attn2.to_k: 4, to_out.0: 16}; the other target modules keep rank and alpha
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder: bool = False  # adapters on the text encoder's attention too
    text_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    merge: bool = False  # also export model/: the full pipeline with the adapters merged into its weights
    # diffusers: lora/pytorch_lora_weights.safetensors; kohya: lora/kohya_lora.safetensors, the key layout of
    # kohya sd-scripts that ComfyUI and AUTOMATIC1111 read; both: the two files
    format: str = "diffusers"

    # rank: 0 is full fine-tuning
    BOUNDS: ClassVar[dict[str, str]] = {"rank": ">= 0", "alpha": "> 0", "dropout": "[0, 1)"}

    def __post_init__(self) -> None:
        check_bounds("lora", self)
        check_choice("lora.format", self.format, LORA_FORMATS)
        check_choice("lora.kind", self.kind, ("lora", "dora", "loha", "lokr"))
        if self.kind in ("loha", "lokr") and self.format != "diffusers":
            raise ConfigError(
                f"lora.kind={self.kind} with lora.format={self.format}: ldm writes LoHa and LoKr in peft's "
                "layout only (lora/unet/adapter_model.safetensors); use lora.format=diffusers"
            )
        if (self.rank_pattern or self.alpha_pattern) and self.format != "diffusers":
            raise ConfigError(
                f"lora.rank_pattern / lora.alpha_pattern with lora.format={self.format}: ldm writes kohya's "
                "layout with one rank and alpha; use lora.format=diffusers (its metadata keeps the patterns)"
            )
        if any(v < 1 for v in self.rank_pattern.values()) or any(v <= 0 for v in self.alpha_pattern.values()):
            raise ConfigError(
                f"lora.rank_pattern {self.rank_pattern} / lora.alpha_pattern {self.alpha_pattern}: ranks must be "
                ">= 1 and alphas > 0"
            )
        if self.kind == "dora" and self.format != "diffusers":
            raise ConfigError(
                f"lora.kind=dora with lora.format={self.format}: kohya's LoRA layout has no DoRA magnitude "
                "vectors; use lora.format=diffusers"
            )
        if not self.target_modules:
            raise ConfigError("config key 'lora.target_modules' is empty; name the UNet layers to adapt")
