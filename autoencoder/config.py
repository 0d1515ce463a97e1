"""Stage-1 config: the KL autoencoder, its objective, and the run around them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ldm.core.config import ConfigError, DataConfig, TrainConfig, check_bounds, check_choice
from ldm.data.build import DATA_SOURCES


@dataclass
class AutoencoderConfig:
    """A diffusers ``AutoencoderKL``; downsampling factor f = 2 ** (len(block_out_channels) - 1)."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    mid_block_attention: bool = False
    in_channels: int = 3

    BOUNDS: ClassVar[dict[str, str]] = {
        "block_out_channels": ">= 1",
        "layers_per_block": ">= 1",
        "latent_channels": ">= 1",
        "norm_num_groups": ">= 1",
        "in_channels": ">= 1",
    }

    def __post_init__(self) -> None:
        check_bounds("model", self)
        if not self.block_out_channels:
            raise ConfigError("config key 'model.block_out_channels' is empty; give one width per level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"config key 'model.block_out_channels' {self.block_out_channels}: every width must be a "
                f"multiple of model.norm_num_groups={self.norm_num_groups}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class VAELossConfig:
    """rec + w_p * LPIPS + w_kl * KL + adaptive w_g * PatchGAN (Esser et al. 2021; Rombach et al. 2022)."""

    rec_loss: str = "l1"  # l1 | l2
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0  # LPIPS weight; used only when its weights are present
    lpips_weights: str | None = None  # local VGG16 backbone file (torchvision format) for LPIPS
    disc_start: int = 2250  # step from which the adversarial term is on
    disc_weight: float = 0.1  # scale of the adaptive adversarial weight
    disc_loss: str = "hinge"  # hinge | vanilla
    disc_layers: int = 2  # PatchGAN depth (3 for 256 px)
    disc_channels: int = 32
    disc_norm: str = "batch"  # batch (SyncBatchNorm on several GPUs) | group | none
    disc_lr: float | None = None  # None: same as train.lr

    BOUNDS: ClassVar[dict[str, str]] = {
        "kl_weight": ">= 0",
        "perceptual_weight": ">= 0",
        "disc_start": ">= 0",
        "disc_weight": ">= 0",
        "disc_layers": ">= 1",
        "disc_channels": ">= 1",
        "disc_lr": "> 0",
    }

    def __post_init__(self) -> None:
        check_choice("loss.rec_loss", self.rec_loss, ("l1", "l2"))
        check_choice("loss.disc_loss", self.disc_loss, ("hinge", "vanilla"))
        check_choice("loss.disc_norm", self.disc_norm, ("batch", "group", "none"))
        check_bounds("loss", self)


@dataclass
class VAEEvalConfig:
    num_samples: int = 512  # validation images for PSNR / SSIM (and rFID)
    scale_samples: int = 1024  # training images used to measure scaling_factor = 1 / std(z)
    inception_weights: str | None = None  # local Inception weights for rFID; None: rFID is skipped

    BOUNDS: ClassVar[dict[str, str]] = {"num_samples": ">= 1", "scale_samples": ">= 1"}

    def __post_init__(self) -> None:
        check_bounds("eval", self)


@dataclass
class VAETrainConfig(TrainConfig):
    """``TrainConfig`` plus what only stage 1 has."""

    decoder_only: bool = False  # train the decoder (and post_quant_conv) only: latents stay as they are


@dataclass
class VAERunConfig:
    output_dir: str = "runs/vae-shapes"
    seed: int = 0
    pretrained: str | None = None  # an AutoencoderKL folder (or a pipeline folder with vae/) to start from
    allow_pickle: bool = False  # let pretrained, LPIPS and Inception weights be pickle files (weights_only)
    data: DataConfig = field(default_factory=DataConfig)
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: VAETrainConfig = field(
        default_factory=lambda: VAETrainConfig(max_steps=3200, lr=1e-3, log_every=50)
    )
    eval: VAEEvalConfig = field(default_factory=VAEEvalConfig)

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.data.dataset, tuple(DATA_SOURCES))
        if self.data.masked_loss:
            raise ConfigError(
                "data.masked_loss weights stage 2's diffusion loss; the autoencoder trains unmasked"
            )
        if self.data.dataset == "sources":
            raise ConfigError(
                "data.dataset=sources (concepts, class images) is stage 2's; train the autoencoder on one "
                "data.path (folder, csv or hf) with data.repeats"
            )
        if self.train.decoder_only and not self.pretrained:
            raise ConfigError(
                "train.decoder_only=true needs pretrained=PATH: the autoencoder whose decoder to fine-tune"
            )
        factor = self.model.downsample_factor
        if not self.pretrained and self.data.resolution % factor:
            raise ConfigError(
                f"config key 'data.resolution' is {self.data.resolution}; it must be a multiple of the "
                f"autoencoder's downsampling factor {factor} (set by model.block_out_channels)"
            )
