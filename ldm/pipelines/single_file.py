"""Single-file checkpoints: one ``.safetensors`` in the original Stable Diffusion key layout.

Writing: the pipeline's UNet, autoencoder and text encoder(s) under the original names
(``ldm.models.single_file``), optionally cast to fp16/bf16, written atomically. The file's metadata
also carries the diffusers configs (``ldm.configs``: model_index, unet, vae, text encoders, scheduler,
tokenizer settings), so that the file alone rebuilds the pipeline offline. Other tools ignore that
metadata.

Reading goes through diffusers' ``from_single_file``, which needs the diffusers configs of the
architecture. In order: ``config`` (a diffusers folder of the same architecture), else the configs
in the file's metadata (files ldm wrote), else the hub configs diffusers infers from the keys
(``infer_diffusers_model_type``), which offline must already be in the Hugging Face cache. When none
is there, the error says what to pass.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ldm.core.errors import ModelError
from ldm.core.io import umask_permissions
from ldm.models.single_file import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_TEXT_PREFIXES,
    LayoutError,
    clip_to_original,
    open_clip_to_original,
    unet_to_original,
    vae_to_original,
)

Pipeline = Any  # a LatentDiffusionPipeline (ldm.pipelines.latent_diffusion imports this module)

SINGLE_FILE_SUFFIXES = (".safetensors",)
SINGLE_FILE = "model.safetensors"  # what a training run exports with export.single_file=true
CONFIG_KEY = "ldm.configs"  # the safetensors metadata entry with the diffusers configs
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDXL_KEY = (
    "conditioner.embedders.1.model.positional_embedding"  # diffusers' CHECKPOINT_KEY_NAMES["open_clip_sdxl"]
)
TOKENIZER_SETTINGS = ("model_max_length", "pad_token", "split_special_tokens")
SD2_FULL_DEPTH = (
    24  # OpenCLIP ViT-H's layers; SD 2.x readers skip the last (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
)


def is_single_file(path: str | Path) -> bool:
    """Whether ``path`` is a single-file checkpoint (a ``.safetensors`` file, not a folder)."""
    path = Path(path)
    return path.suffix in SINGLE_FILE_SUFFIXES and path.is_file()


def is_open_clip_encoder(text_encoder) -> bool:
    """OpenCLIP text towers (SD 2.x) use exact GELU; OpenAI's CLIP (SD 1.x) uses quick_gelu."""
    return text_encoder.config.hidden_act == "gelu"


def original_state_dict(pipe: Pipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original layout: UNet, autoencoder and text encoder(s)."""
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    state = unet_to_original(unet.state_dict(), dict(unet.config))
    state.update(vae_to_original(pipe.vae.state_dict(), dict(pipe.vae.config)))
    if pipe.is_sdxl:
        state.update(clip_to_original(pipe.text_encoder.state_dict(), SDXL_TEXT_PREFIXES[0]))
        state.update(open_clip_to_original(pipe.text_encoder_2.state_dict(), SDXL_TEXT_PREFIXES[1]))
    elif is_open_clip_encoder(pipe.text_encoder):
        layers = pipe.text_encoder.config.num_hidden_layers
        if layers >= SD2_FULL_DEPTH:
            raise LayoutError(
                f"the OpenCLIP text encoder has {layers} layers: SD 2.x single-file readers (diffusers, "
                f"ComfyUI, AUTOMATIC1111) take such a file for OpenCLIP ViT-H's {SD2_FULL_DEPTH} and drop layer "
                f"{SD2_FULL_DEPTH - 1}, which this model uses; keep it as a diffusers folder"
            )
        state.update(open_clip_to_original(pipe.text_encoder.state_dict(), SD2_TEXT_PREFIX))
    else:
        state.update(clip_to_original(pipe.text_encoder.state_dict(), SD1_TEXT_PREFIX))
    return state


def _tokenizer_settings(tokenizer) -> dict[str, Any]:
    return {
        "model_max_length": tokenizer.model_max_length,
        "pad_token": str(tokenizer.pad_token),
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
    }


def pipeline_configs(pipe: Pipeline) -> dict[str, Any]:
    """The diffusers configs that rebuild ``pipe`` around the weights (JSON-able)."""
    sd = pipe.as_diffusers()
    configs = {
        "model_index": dict(sd.config),
        "unet": json.loads(sd.unet.to_json_string()),
        "vae": json.loads(sd.vae.to_json_string()),
        "scheduler": json.loads(sd.scheduler.to_json_string()),
        "text_encoder": sd.text_encoder.config.to_dict(),
        "tokenizer": _tokenizer_settings(sd.tokenizer),
    }
    if pipe.is_sdxl:
        configs["text_encoder_2"] = sd.text_encoder_2.config.to_dict()
        configs["tokenizer_2"] = _tokenizer_settings(sd.tokenizer_2)
    return json.loads(json.dumps(configs, default=str))


def save_single_file(pipe: Pipeline, path: str | Path, dtype: str = "fp32") -> Path:
    """Write ``pipe`` to ``path`` (``.safetensors``) in the original layout, weights cast to ``dtype``
    (fp32 | fp16 | bf16), through a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: a single-file checkpoint is written as .safetensors; give OUT.safetensors")
    if dtype not in DTYPES:
        raise ModelError(f"dtype={dtype}: choose one of {', '.join(DTYPES)}")
    state = {
        k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in original_state_dict(pipe).items()
    }
    metadata = {CONFIG_KEY: json.dumps(pipeline_configs(pipe)), "format": "pt"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    umask_permissions(tmp)
    os.replace(tmp, path)
    return path


def file_configs(path: str | Path) -> dict[str, Any] | None:
    """The diffusers configs in a file ldm wrote, or None for other files."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None


def writeconfig_folder(configs: dict[str, Any], folder: Path) -> Path:
    """A diffusers pipeline folder without weights (what ``from_single_file(config=...)`` reads):
    each part's config, and tokenizers rebuilt offline from open_clip's BPE vocabulary."""
    from transformers import CLIPTokenizer

    from conditioning.tokenizer import write_clip_vocab

    (folder / "model_index.json").write_text(json.dumps(configs["model_index"]))
    files = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}
    files.update({k: "config.json" for k in ("text_encoder", "text_encoder_2") if k in configs})
    for part, name in files.items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / name).write_text(json.dumps(configs[part]))
    for part in ("tokenizer", "tokenizer_2"):
        if part in configs:
            vocab = write_clip_vocab(folder / f".{part}-vocab")
            settings = {k: configs[part][k] for k in TOKENIZER_SETTINGS if k in configs[part]}
            tokenizer = CLIPTokenizer.from_pretrained(vocab, local_files_only=True, **settings)
            tokenizer.save_pretrained(folder / part)
    return folder


@contextmanager
def config_folder(path: Path, config: str | Path | None):
    """The config folder for ``path``: ``config``, else one written from the file's metadata, else None."""
    if config is not None:
        yield str(config)
        return
    configs = file_configs(path)
    if configs is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ldm-single-file-") as tmp:
        yield str(writeconfig_folder(configs, Path(tmp)))


def _has_key(path: Path, key: str) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return key in f.keys()


def _meta_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The file's keys with empty tensors of their shapes (what diffusers' type inference reads)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}


def check_hub_configs(path: Path) -> None:
    """For a file without configs: the hub configs diffusers would use must be in the Hugging Face
    cache (else diffusers goes online for them); a ``ModelError`` saying what to pass when they are not."""
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_DEFAULT_PIPELINE_PATHS,
        infer_diffusers_model_type,
    )
    from huggingface_hub import try_to_load_from_cache

    kind = infer_diffusers_model_type(_meta_checkpoint(path))
    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS.get(kind, {}).get("pretrained_model_name_or_path")
    if repo is not None and isinstance(try_to_load_from_cache(repo, "model_index.json"), str):
        return
    raise ModelError(
        f"{path} is a single-file checkpoint without ldm's configs in its metadata; diffusers reads it as "
        f"{kind!r}, whose configs ({repo}) are not in the Hugging Face cache. Give a diffusers folder of "
        "the same architecture (the same model's folder, or one downloaded without its weights) as its "
        "configs: ldm-export --config FOLDER, train_ldm.py pretrained_config=FOLDER, "
        "from_pretrained(FILE, config=FOLDER)"
    )


def check_single_file_layout(pipe: Pipeline) -> None:
    """Raise the ``LayoutError`` ``save_single_file`` would, now (the mapping holds references only)."""
    original_state_dict(pipe)


def load_single_file(path: str | Path, config: str | Path | None = None, dtype: torch.dtype | None = None):
    """A diffusers ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` when the file holds
    SDXL's second encoder) from a single file, through diffusers' ``from_single_file``, offline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no single-file checkpoint at {path}")
    cls = StableDiffusionXLPipeline if _has_key(path, SDXL_KEY) else StableDiffusionPipeline
    extra = (
        {} if cls is StableDiffusionXLPipeline else {"safety_checker": None, "requires_safety_checker": False}
    )
    with config_folder(path, config) as folder:
        source = f"config={config}" if config is not None else "the configs in its metadata"
        if folder is None:
            check_hub_configs(path)
            source = "the hub configs in the Hugging Face cache"
        try:
            sd = cls.from_single_file(
                str(path), config=folder, local_files_only=True, torch_dtype=dtype, **extra
            )
        except (OSError, ValueError) as e:
            raise ModelError(f"{path} with {source}: diffusers could not load it: {e}") from e
    if cls is StableDiffusionXLPipeline:
        _reload_second_encoder(sd, path)
    return sd


def _reload_second_encoder(sd, path: Path) -> None:
    """diffusers tells SDXL's two encoders apart by width (768 vs 1280 in SDXL); when both are as
    wide, ``from_single_file`` loads the first encoder's weights into ``text_encoder_2``. Load the
    OpenCLIP tower (``conditioner.embedders.1.model.``) into it with diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open

    second = sd.text_encoder_2
    if sd.text_encoder.config.hidden_size != second.config.hidden_size:
        return
    with safe_open(str(path), "pt") as f:
        tower = {k: f.get_tensor(k) for k in f.keys() if k.startswith(SDXL_TEXT_PREFIXES[1])}
    state = convert_open_clip_checkpoint(second, tower, prefix=SDXL_TEXT_PREFIXES[1])
    dtype = sd.text_encoder.dtype
    second.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
