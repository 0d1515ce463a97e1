"""The three networks of stage 2: the frozen autoencoder, the text encoder and the UNet.

Fresh: the stage-1 export at ``vae``, a text encoder from ``text`` (SDXL conditioner: and one from
``text_2``), a UNet from ``unet``. From ``pretrained`` (a diffusers Stable Diffusion folder, ours or
SD 1.x/2.x/SDXL): its vae/, text_encoder/ + tokenizer/ (SDXL: text_encoder_2/ + tokenizer_2/) and unet/.
A single-file ``pretrained`` (``.safetensors``, original layout) is first converted to such a folder
in the run's output folder (``pretrained_folder``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from conditioning import Conditioner, TextEncoder, build_text_encoder
from conditioning.conditioner import sdxl_conditioner
from ldm.core.errors import ConfigError, MissingFileError, ModelError
from ldm.core.safe_load import check_model_folder, from_pretrained_kwargs
from ldm.diffusion.config import BETA_SCHEDULES, PREDICTION_TYPES, NoiseConfig
from ldm.diffusion.registry import FLOW_SCHEDULERS
from ldm.models.autoencoder import IdentityAutoencoder, downsampling_factor
from ldm.models.unet import build_unet
from ldm.pipelines.folder import (
    PIPELINE_PARTS,
    check_pipeline_folder,
    is_pixel_folder,
    is_sdxl_folder,
    pipeline_index,
)
from ldm.train.config import LDMRunConfig

MODEL_PARTS = tuple(p for p in PIPELINE_PARTS if p != "scheduler")  # scheduler/: read when present
DEFAULT_VAE = "runs/vae-shapes/model"  # where python train_vae.py exports by default
IDENTITY_DIR = Path("<identity autoencoder>")  # what stands for a pixel model's autoencoder folder
logger = logging.getLogger("ldm")


def pretrained_noise(pretrained: str | Path, noise: NoiseConfig) -> NoiseConfig:
    """``noise`` with the schedule and prediction type of ``pretrained``/scheduler: fine-tuning keeps
    the process the UNet learned (SD 1.x: scaled_linear epsilon; SD 2.x 768: v_prediction)."""
    from diffusers import DDPMScheduler

    folder = Path(pretrained) / "scheduler"
    if not (folder / "scheduler_config.json").exists():
        raise MissingFileError(f"pretrained={pretrained} has no scheduler/scheduler_config.json")
    sc = DDPMScheduler.load_config(folder)
    if sc.get("_class_name") in FLOW_SCHEDULERS:  # a rectified-flow model: its time scale and shift
        flow = dataclasses.replace(
            noise, objective="rectified_flow", num_train_timesteps=sc.get("num_train_timesteps", 1000),
            shift=sc.get("shift", 1.0), prediction_type="epsilon", min_snr_gamma=0.0, zero_terminal_snr=False,
            debiased_estimation=False,
        )  # fmt: skip
        if noise.debiased_estimation or noise.min_snr_gamma:
            logger.warning(
                "%s is a rectified-flow model: noise.debiased_estimation and min_snr_gamma (DDPM loss weights) are off",
                folder,
            )
        logger.info("objective from %s: rectified flow, shift %g", folder, flow.shift)
        return flow
    if noise.objective != "ddpm":
        raise ConfigError(
            f"pretrained={pretrained} is a DDPM model ({sc.get('_class_name')}); noise.objective={noise.objective} "
            "would train it on another objective: leave noise.objective=ddpm"
        )
    schedule, prediction = sc.get("beta_schedule", "linear"), sc.get("prediction_type", "epsilon")
    if schedule not in BETA_SCHEDULES or prediction not in PREDICTION_TYPES:
        raise ModelError(
            f"{folder}: beta_schedule {schedule!r} / prediction_type {prediction!r} not supported "
            f"(beta schedules: {', '.join(BETA_SCHEDULES)}; predictions: {', '.join(PREDICTION_TYPES)})"
        )
    adopted = dataclasses.replace(
        noise,
        num_train_timesteps=sc.get("num_train_timesteps", 1000),
        beta_schedule=schedule,
        beta_start=sc.get("beta_start", noise.beta_start),
        beta_end=sc.get("beta_end", noise.beta_end),
        zero_terminal_snr=bool(sc.get("rescale_betas_zero_snr", False)),
        prediction_type=prediction,
    )
    logger.info(
        "noise schedule from %s: %s, %d steps, beta %.5f..%.5f, predicts %s",
        folder, schedule, adopted.num_train_timesteps, adopted.beta_start, adopted.beta_end, prediction,
    )  # fmt: skip
    return adopted


def load_autoencoder(cfg: LDMRunConfig) -> tuple[AutoencoderKL | IdentityAutoencoder, Path]:
    """The frozen autoencoder: ``vae`` when set, else ``pretrained``/vae, else stage 1's default export;
    the identity (``IDENTITY_DIR`` stands for its folder) for ``autoencoder.kind=identity`` or a
    pretrained pixel-space folder (one without vae/).

    ``vae`` next to ``pretrained`` replaces the pipeline's autoencoder, e.g. with its decoder fine-tuned
    on the new data; it must make the same latents (channels and downsampling factor, checked), and the
    exported pipeline carries it.
    """
    pixel_folder = bool(cfg.pretrained) and is_pixel_folder(cfg.pretrained)
    if cfg.autoencoder.kind == "identity" or pixel_folder:
        if cfg.pretrained and not pixel_folder:
            raise ConfigError(
                f"autoencoder.kind=identity trains on pixels, but pretrained={cfg.pretrained} is a latent model "
                "(it has vae/): leave autoencoder.kind=kl to fine-tune it, or start a pixel model from scratch"
            )
        if pixel_folder and cfg.vae:
            raise ConfigError(
                f"pretrained={cfg.pretrained} is a pixel-space model (no vae/), so vae={cfg.vae} has no latents "
                "to replace: leave vae unset"
            )
        return IdentityAutoencoder(3, cfg.data.resolution), IDENTITY_DIR
    if cfg.vae:
        folder, what = Path(cfg.vae), "autoencoder (vae=)"
    elif cfg.pretrained:
        folder, what = Path(cfg.pretrained) / "vae", "autoencoder (pretrained=.../vae)"
    else:
        folder, what = Path(DEFAULT_VAE), "autoencoder"
    if not cfg.pretrained and not (folder / "config.json").exists():  # the stage-1 export, not there yet
        raise MissingFileError(f"no autoencoder at {folder}: run python train_vae.py first, or set vae=PATH")
    check_model_folder(folder, cfg.allow_pickle, what)
    vae = AutoencoderKL.from_pretrained(folder, **from_pretrained_kwargs(cfg.allow_pickle))
    if cfg.vae and cfg.pretrained:
        check_replacement(vae, folder, Path(cfg.pretrained) / "vae")
    return vae, folder


def check_replacement(vae: AutoencoderKL, folder: Path, original_dir: Path) -> None:
    """A replacement autoencoder must make the latents the pretrained UNet learned: same channels and
    factor (an error otherwise); another ``scaling_factor`` gets a warning (the UNet's inputs rescale)."""
    if not (original_dir / "config.json").exists():
        return
    original = AutoencoderKL.load_config(original_dir)
    for key, what in (("latent_channels", "latent channels"), ("block_out_channels", "levels")):
        mine, theirs = vae.config[key], original.get(key)
        if key == "block_out_channels":
            mine, theirs = len(mine), len(theirs or [])
        if theirs is not None and mine != theirs:
            raise ModelError(
                f"vae={folder} has {mine} {what} but the pretrained pipeline's autoencoder ({original_dir}) "
                f"has {theirs}: its latents would not be the ones the UNet learned; give an autoencoder "
                "fine-tuned from that one (configs/vae/decoder-finetune.yaml keeps its encoder)"
            )
    theirs = original.get("scaling_factor")
    if theirs is not None and abs(vae.config.scaling_factor - theirs) > 1e-6 * abs(theirs):
        logger.warning(
            "vae=%s has scaling_factor %g, the pretrained autoencoder %g: the UNet will see rescaled latents",
            folder, vae.config.scaling_factor, theirs,
        )  # fmt: skip
    logger.info("autoencoder %s replaces %s", folder, original_dir)


def pretrained_folder(cfg: LDMRunConfig) -> LDMRunConfig:
    """``cfg`` with a single-file ``pretrained`` replaced by a diffusers folder converted from it,
    ``output_dir/pretrained`` (through diffusers' ``from_single_file``; ``pretrained_config``: the
    configs for a file ldm did not write). The main process converts, once per source file (its size
    and modification time are kept in ``source.json``); the others wait and read the result."""
    from accelerate import PartialState

    from ldm.core.io import write_json
    from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
    from ldm.pipelines.single_file import SINGLE_FILE_SUFFIXES

    if not cfg.pretrained or Path(cfg.pretrained).suffix not in SINGLE_FILE_SUFFIXES:
        return cfg
    source = Path(cfg.pretrained)
    if not source.is_file():
        raise MissingFileError(f"pretrained={source}: no such file")
    folder = Path(cfg.output_dir) / "pretrained"
    stat = source.stat()
    record = {"source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    with PartialState().main_process_first():
        done = folder / "source.json"
        if not (done.is_file() and json.loads(done.read_text()) == record):
            pipe = LatentDiffusionPipeline.from_pretrained(
                source, config=cfg.pretrained_config, channels_last=False
            )
            pipe.save_pretrained(folder)
            write_json(done, record)
            logger.info("converted the single file %s to the diffusers folder %s", source, folder)
    return dataclasses.replace(cfg, pretrained=str(folder), pretrained_config=None)


def is_sdxl_run(cfg: LDMRunConfig) -> bool:
    """Whether the run trains an SDXL-type model: a pretrained SDXL folder, or ``conditioner=sdxl``."""
    return is_sdxl_folder(cfg.pretrained) if cfg.pretrained else cfg.conditioner == "sdxl"


def make_conditioner(cfg: LDMRunConfig, encoders: list[TextEncoder]) -> Conditioner:
    """The run's conditioner over its encoders: SDXL's for two (zeros as the unconditional input
    unless the pretrained folder says otherwise), else the single encoder's."""
    if len(encoders) == 1:
        return Conditioner(encoders, cfg.text.p_uncond)
    zeros = (
        pipeline_index(cfg.pretrained).get("force_zeros_for_empty_prompt", True) if cfg.pretrained else True
    )
    return sdxl_conditioner(*encoders, p_uncond=cfg.text.p_uncond, zero_uncond=zeros, freeze_unreached=True)


def _pretrained_second_encoder(cfg: LDMRunConfig) -> TextEncoder:
    """An SDXL folder's text_encoder_2/ (a CLIPTextModelWithProjection) and tokenizer_2/, frozen
    unless ``text.train``."""
    root = Path(cfg.pretrained)
    check_model_folder(root / "text_encoder_2", cfg.allow_pickle, "second text encoder")
    model = CLIPTextModelWithProjection.from_pretrained(
        root / "text_encoder_2", **from_pretrained_kwargs(cfg.allow_pickle)
    ).float()
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer_2")
    return TextEncoder(model, tokenizer, tokenizer.model_max_length, trainable=bool(cfg.text.train))


def build_text_encoders(cfg: LDMRunConfig) -> list[TextEncoder]:
    """The run's text encoders: a pretrained folder's own (SDXL: both), else those ``text`` (and, for
    the SDXL conditioner, ``text_2``) describe."""
    if not cfg.pretrained:
        encoders = [build_text_encoder(cfg.text, cfg.allow_pickle)]
        if cfg.conditioner == "sdxl":
            encoders.append(build_text_encoder(cfg.text_2, cfg.allow_pickle))
        return encoders
    # the pipeline's own text encoder as it is: its context length, its last layer
    max_length = CLIPTokenizer.from_pretrained(Path(cfg.pretrained) / "tokenizer").model_max_length
    text_cfg = dataclasses.replace(
        cfg.text,
        kind="clip",
        name_or_path=cfg.pretrained,
        pretrained=None,
        layer="last",
        max_length=max_length,
    )
    encoders = [build_text_encoder(text_cfg, cfg.allow_pickle)]
    if is_sdxl_folder(cfg.pretrained):
        encoders.append(_pretrained_second_encoder(cfg))
    return encoders


def build_models(
    cfg: LDMRunConfig,
) -> tuple[AutoencoderKL, Path, list[TextEncoder], UNet2DConditionModel]:
    """(autoencoder, its folder, text encoders, UNet), checked to fit together."""
    if cfg.pretrained:
        check_pipeline_folder(cfg.pretrained, MODEL_PARTS)
        check_model_folder(Path(cfg.pretrained) / "unet", cfg.allow_pickle, "UNet")
    vae, vae_dir = load_autoencoder(cfg)
    factor = downsampling_factor(vae)
    if cfg.data.resolution % factor:
        raise ConfigError(
            f"config key 'data.resolution' is {cfg.data.resolution}; it must be a multiple of the "
            f"downsampling factor {factor} of the autoencoder at {vae_dir}"
        )
    encoders = build_text_encoders(cfg)
    conditioner = make_conditioner(cfg, encoders)
    if cfg.pretrained:
        unet = UNet2DConditionModel.from_pretrained(
            Path(cfg.pretrained) / "unet", **from_pretrained_kwargs(cfg.allow_pickle)
        )
        if cfg.unet.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
    else:
        unet = build_unet(
            cfg.unet, vae.config.latent_channels, cfg.data.resolution // factor, conditioner.hidden_size,
            conditioner.pooled_size,
        )  # fmt: skip
    check_compatible(vae, conditioner, unet)
    return vae, vae_dir, encoders, unet


def check_compatible(vae: AutoencoderKL, text_encoder: Conditioner, unet: UNet2DConditionModel) -> None:
    """Latent channels and context width must agree, with a message that says which and what to do."""
    if unet.config.in_channels != vae.config.latent_channels:
        raise ModelError(
            f"the autoencoder has {vae.config.latent_channels} latent channels but the UNet takes "
            f"{unet.config.in_channels}: use an autoencoder with {unet.config.in_channels} latent channels "
            "(vae=PATH) or a UNet built for this one"
        )
    if unet.config.cross_attention_dim != text_encoder.hidden_size:
        raise ModelError(
            f"the text encoder gives {text_encoder.hidden_size}-wide contexts but the UNet's cross_attention_dim "
            f"is {unet.config.cross_attention_dim}"
        )
    added = unet.config.addition_embed_type == "text_time"
    if added != text_encoder.micro_conditioning:
        raise ModelError(
            "the UNet takes SDXL's added conditioning (text_time) but the conditioner gives none"
            if added
            else "the conditioner gives SDXL's pooled embedding and time ids but the UNet takes none"
        )
