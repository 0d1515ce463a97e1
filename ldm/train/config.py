"""Stage-2 run config: the networks, the objective, the text encoder, sampling, evaluation and the run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from conditioning.config import NewTokensConfig, TextEncoderConfig
from conditioning.encoders import TEXT_ENCODERS
from ldm.core.config import ConfigError, DataConfig, TrainConfig, check_bounds, check_choice
from ldm.data.build import DATA_SOURCES
from ldm.data.captions import CaptionConfig
from ldm.diffusion.config import NoiseConfig
from ldm.diffusion.registry import OBJECTIVES
from ldm.models.autoencoder import AUTOENCODER_KINDS
from ldm.models.config import LoRAConfig, UNetConfig
from ldm.pipelines.prompts import read_prompt_file
from ldm.pipelines.samplers import SAMPLERS, check_sampler

CONDITIONERS = ("text", "sdxl")


@dataclass
class SampleConfig:
    """Sampling for the periodic grids and the final evaluation."""

    sampler: str = "dpm++2m"
    steps: int = 20
    guidance_scale: float = 4.0
    prompts: list[str] = field(default_factory=list)  # grid prompts; empty: the first validation captions
    # a file of grid prompts, one a line with kohya-style options (--n --l --s --d --w --h;
    # ldm/pipelines/prompts.py); replaces `prompts`
    prompts_file: str | None = None
    grid_prompts: int = 6  # prompts in a grid when `prompts` is empty
    grid_seeds: int = 4  # seeds per prompt in a grid

    BOUNDS: ClassVar[dict[str, str]] = {"steps": ">= 1", "grid_prompts": ">= 1", "grid_seeds": ">= 1"}

    def __post_init__(self) -> None:
        check_choice("sample.sampler", self.sampler, tuple(SAMPLERS))
        check_bounds("sample", self)
        if self.prompts_file is not None:
            read_prompt_file(self.prompts_file)  # a bad line stops the run here, before anything loads


@dataclass
class ExportConfig:
    """What the run writes at the end besides ``model/`` (a diffusers folder)."""

    # also model.safetensors: one file in the original Stable Diffusion layout (ComfyUI, AUTOMATIC1111,
    # diffusers' from_single_file); with LoRA only when lora.merge=true
    single_file: bool = False
    dtype: str = "fp32"  # the single file's weights: fp32 | fp16 (half the size) | bf16

    def __post_init__(self) -> None:
        check_choice("export.dtype", self.dtype, ("fp32", "fp16", "bf16"))


@dataclass
class LDMEvalConfig:
    """The end-of-run evaluation and report (``ldm.eval``); ``ldm-eval`` takes the same keys."""

    num_samples: int = (
        324  # images per guidance scale: distinct validation captions x seeds_per_prompt; 0: no evaluation
    )
    seeds_per_prompt: int = 6  # images per caption (sample diversity compares them)
    batch_size: int = 108
    guidance_scales: list[float] = field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0]
    )  # + sample.guidance_scale
    bound_samples: int = 128  # held-out latents for the variational bound and the loss per timestep
    bound_strata: int = 50  # timesteps sampled for the bound's sum over t (one per stratum)
    timestep_points: int = 20  # timesteps of the loss-per-timestep curve
    inception_weights: str | None = None  # local Inception-v3 weights: FID and KID; None: skipped
    fid_reference: str | None = None  # folder of reference images for FID/KID; None: the validation images
    clip_model: str | None = None  # local CLIPModel folder: CLIP score; None: skipped

    BOUNDS: ClassVar[dict[str, str]] = {
        "num_samples": ">= 0",
        "seeds_per_prompt": ">= 1",
        "batch_size": ">= 1",
        "bound_samples": ">= 1",
        "bound_strata": ">= 1",
        "timestep_points": ">= 2",
    }

    def __post_init__(self) -> None:
        check_bounds("eval", self)


@dataclass
class PreflightConfig:
    """Checks before training that the base model can carry the data (``ldm/train/preflight.py``)."""

    # training images and captions the checks look at; 0: no checks
    samples: int = 64
    # reconstruction PSNR (dB) below which the autoencoder cannot draw the data
    min_psnr: float = 22.0
    # share of caption tokens a scratch text encoder never saw above which it must learn new words
    max_unseen_tokens: float = 0.05

    BOUNDS: ClassVar[dict[str, str]] = {"samples": ">= 0", "max_unseen_tokens": "[0, 1]"}

    def __post_init__(self) -> None:
        check_bounds("preflight", self)


@dataclass
class AutoencoderChoice:
    """Which first stage makes the latents."""

    # kl: a stage-1 AutoencoderKL (``vae``, or ``pretrained``'s vae/); identity: none, f = 1, stage 2
    # diffuses pixels (DDPM, Ho et al. 2020; ``ldm.models.autoencoder.IdentityAutoencoder``)
    kind: str = "kl"

    def __post_init__(self) -> None:
        check_choice("autoencoder.kind", self.kind, AUTOENCODER_KINDS)


@dataclass
class LDMRunConfig:
    output_dir: str = "runs/ldm-shapes"
    seed: int = 0
    # a stage-1 export (AutoencoderKL folder); None: pretrained's vae/, else runs/vae-shapes/model.
    # With pretrained, it replaces that pipeline's autoencoder (same latents, e.g. a fine-tuned decoder)
    vae: str | None = None
    # a diffusers StableDiffusionPipeline folder to start from: its vae, text encoder, UNet and noise
    # schedule (ours, or Stable Diffusion 1.x/2.x); overrides unet, text, noise
    # or a single-file checkpoint (.safetensors, original SD layout), converted to a folder first
    pretrained: str | None = None
    pretrained_config: str | None = None  # a single file's diffusers configs (a folder), unless ldm wrote it
    allow_pickle: bool = False  # let pretrained weights be pickle files (read with weights_only=True)
    autoencoder: AutoencoderChoice = field(default_factory=AutoencoderChoice)
    data: DataConfig = field(default_factory=lambda: DataConfig(train_size=20_000, val_size=324, flip=False))
    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(max_length=16))
    # text: one text encoder (SD 1.x/2.x); sdxl: text and text_2 (with a projection) as SDXL has them.
    # A pretrained folder decides for itself (text_encoder_2/ makes it sdxl)
    conditioner: str = "text"
    text_2: TextEncoderConfig = field(
        default_factory=lambda: TextEncoderConfig(max_length=16, with_projection=True)
    )  # the sdxl conditioner's second encoder
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)  # tag shuffle, tag dropout, prefix
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=64,
            max_steps=1800,
            lr=1e-3,
            lr_warmup_steps=100,
            weight_decay=0.01,
            ema_decay=0.999,
            compile=True,
        )
    )
    sample: SampleConfig = field(default_factory=SampleConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ti: NewTokensConfig = field(default_factory=NewTokensConfig)  # textual inversion; + LoRA: pivotal tuning
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: LDMEvalConfig = field(default_factory=LDMEvalConfig)
    cache_latents: bool = True  # encode the dataset once with the frozen autoencoder
    # keep the latent cache on disk here, in shards (ldm-cache precomputes it); None: in memory
    cache_dir: str | None = None
    cache_shard_items: int | None = None  # items per disk-cache shard; None: about 256 MB of latents each
    preflight: PreflightConfig = field(default_factory=PreflightConfig)

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.data.dataset, tuple(DATA_SOURCES))
        check_choice("noise.objective", self.noise.objective, tuple(OBJECTIVES))
        check_choice("text.kind", self.text.kind, tuple(TEXT_ENCODERS))
        check_choice("conditioner", self.conditioner, CONDITIONERS)
        if self.conditioner == "sdxl" and not self.pretrained:
            check_choice("text_2.kind", self.text_2.kind, tuple(TEXT_ENCODERS))
            if not self.text_2.with_projection:
                raise ConfigError(
                    "conditioner=sdxl: text_2.with_projection must be true (its pooled embedding)"
                )
            for key, text in (("text", self.text), ("text_2", self.text_2)):
                if text.kind == "scratch" and text.num_layers < 2:
                    raise ConfigError(
                        f"conditioner=sdxl reads {key}'s second-to-last hidden state: set {key}.num_layers >= 2"
                    )
                if text.layer != "last":
                    raise ConfigError(
                        f"conditioner=sdxl reads hidden_states[-2] itself: leave {key}.layer=last"
                    )
            if self.text.max_length != self.text_2.max_length:
                raise ConfigError("conditioner=sdxl: text.max_length and text_2.max_length must be equal")
        check_sampler(self.sample.sampler, self.noise.objective, "sample.sampler")
        if self.autoencoder.kind == "identity" and self.vae:
            raise ConfigError(
                f"autoencoder.kind=identity trains on pixels, with no autoencoder, but vae={self.vae} is set: "
                "leave vae unset, or set autoencoder.kind=kl"
            )
        if self.autoencoder.kind == "identity" and self.export.single_file:
            raise ConfigError(
                "export.single_file=true writes the original Stable Diffusion layout, which holds a VAE; "
                "a pixel-space model (autoencoder.kind=identity) has none: set export.single_file=false"
            )
        if self.lora.rank and self.text.train:
            raise ConfigError(
                "lora.rank > 0 with text.train=true: LoRA freezes the base weights; "
                "set lora.text_encoder=true for adapters on the text encoder, or lora.rank=0 to train it in full"
            )
        if self.export.single_file and self.lora.rank and not self.lora.merge:
            raise ConfigError(
                "export.single_file=true with LoRA writes the merged model: set lora.merge=true "
                "(the adapters alone go to lora/, in lora.format's layout)"
            )
        if self.ti.tokens:
            self._check_new_tokens()
        if self.lora.text_encoder and not self.lora.rank:
            raise ConfigError("lora.text_encoder=true needs lora.rank >= 1")
        if self.cache_shard_items is not None and self.cache_shard_items < 1:
            raise ConfigError(
                f"cache_shard_items={self.cache_shard_items}: give at least 1 (or leave it unset)"
            )
        if self.cache_latents and self.data.streaming and not self.cache_dir:
            raise ConfigError(
                "cache_latents=true with data.streaming caches the stream on disk: set cache_dir=DIR "
                "(read once, shard by shard), or cache_latents=false to encode every step"
            )
        drawn = [s.path for s in self.data.sources if s.role == "regularization" and s.num_class_images]
        if drawn and not self.pretrained:
            raise ConfigError(
                f"data.sources: {drawn[0]} asks for class images (num_class_images), which the base model "
                "draws: set pretrained=PATH (a model that already draws the class), or bring class images "
                "and set num_class_images=0"
            )
        if self.cache_latents and (self.data.flip or self.data.crop == "random"):
            raise ConfigError(
                "cache_latents=true encodes each image once, unaugmented: set data.flip=false and "
                "data.crop=center, or cache_latents=false to augment every step"
            )

    def _check_new_tokens(self) -> None:
        text_trains = self.text.train if self.pretrained else self.text.trainable
        if text_trains:
            raise ConfigError(
                "ti.tokens trains the new tokens' rows with the text encoder frozen, but text.train is on "
                f"({'set' if self.text.train else 'a scratch encoder trains by default'}): set text.train=false"
            )
        if self.conditioner == "sdxl" and not self.pretrained and self.text_2.trainable:
            raise ConfigError("ti.tokens trains with the text encoders frozen: set text_2.train=false too")
        if self.ti.merge and self.lora.rank:
            raise ConfigError(
                "ti.merge=true with LoRA: leave ti.merge unset and set lora.merge=true (model/ then holds both)"
            )
        if self.train.optimizer == "prodigy" and self.lora.rank and self.ti.lr not in (None, self.train.lr):
            raise ConfigError(
                f"train.optimizer=prodigy with ti.lr={self.ti.lr} and train.lr={self.train.lr}: Prodigy takes one lr "
                "for all its parameter groups; leave ti.lr unset (or equal to train.lr)"
            )
        if self.export.single_file:
            raise ConfigError(
                "export.single_file=true with ti.tokens: AUTOMATIC1111 and ComfyUI load the embeddings/ files "
                "next to the base model's single file, and read no new rows in one; set export.single_file=false"
            )
