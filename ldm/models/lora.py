"""LoRA fine-tuning with peft: adapters on the UNet (and the text encoder), saved as diffusers loads them.

Each adapted linear layer computes W x + (alpha / r) B A x with A (r x in), B (out x r), B = 0 at the
start (Hu et al. 2021); only A and B train. The adapters are saved in diffusers' LoRA format
(``pytorch_lora_weights.safetensors``), which ``StableDiffusionPipeline.load_lora_weights`` and
``LatentDiffusionPipeline.load_lora_weights`` load.

Adapters go in through peft's own API (``inject_adapter_in_model``), not through transformers'
``add_adapter``: transformers 5.24 gates that behind peft >= 0.22, a release that did not exist
when it came out, and the UNet's ``add_adapter`` (diffusers) is itself a thin wrapper over the
same peft call.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel

from ldm.core.io import replace_dir, umask_permissions
from ldm.models.config import LoRAConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "kohya_lora.safetensors"
KOHYA_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}


PEFT_KINDS = ("loha", "lokr")  # kinds diffusers' LoRA files cannot hold: saved in peft's own layout
PEFT_PARTS = ("unet", "text_encoder", "text_encoder_2")  # lora/<part>/ of a peft-layout adapter folder
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's file names


def _peft_config(cfg: LoRAConfig, targets: list[str]):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    # LoHa (Hyeon-Woo et al. 2022) and LoKr (LyCORIS): Hadamard / Kronecker products of low-rank factors
    if cfg.kind in PEFT_KINDS:
        kind = LoHaConfig if cfg.kind == "loha" else LoKrConfig
        # init_weights: one factor zero, so the model starts unchanged (as LoRA's B = 0); lora.dropout is
        # peft's rank_dropout here (it drops rank components, not inputs)
        return kind(
            r=cfg.rank, alpha=alpha, rank_dropout=cfg.dropout, target_modules=targets, init_weights=True,
            rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern),
        )  # fmt: skip
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=alpha,
        rank_pattern=dict(cfg.rank_pattern),  # per module kind (a name pattern -> rank / alpha)
        alpha_pattern=dict(cfg.alpha_pattern),
        lora_dropout=cfg.dropout,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the model starts unchanged
        target_modules=targets,
        use_dora=cfg.kind == "dora",  # magnitude m = ||W|| per output at the start: unchanged too
    )


def inject_adapter(model: nn.Module, config, name: str = "default") -> list[nn.Parameter]:
    """Add peft adapter layers to ``model`` in place; returns their (trainable) parameters.

    ``model.peft_config[name]`` keeps the config, where peft's ``get_peft_model_state_dict`` and
    diffusers' LoRA savers look for it.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model, adapter_name=name)
    if not isinstance(getattr(model, "peft_config", None), dict):
        model.peft_config = {}
    model.peft_config[name] = config
    prefixes = ("lora_", "hada_", "lokr_")  # LoRA's, LoHa's and LoKr's parameters
    params = [
        p for n, p in model.named_parameters() if name in n.split(".") and any(x in n for x in prefixes)
    ]
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ValueError(
            f"LoRA target modules {config.target_modules} matched no layer of {type(model).__name__}"
        )
    return params


def add_lora(
    unet: UNet2DConditionModel, text_models: list[CLIPTextModel], cfg: LoRAConfig
) -> list[nn.Parameter]:
    """Freeze the base weights, add adapters (to the UNet, and with ``lora.text_encoder`` to every
    text encoder: SDXL has two); returns the parameters to train (the adapters')."""
    unet.requires_grad_(False)
    unet.add_adapter(_peft_config(cfg, cfg.target_modules))
    params = [p for p in unet.parameters() if p.requires_grad]
    if cfg.text_encoder:
        for text_model in text_models:
            text_model.requires_grad_(False)
            params += inject_adapter(text_model, _peft_config(cfg, cfg.text_target_modules))
    if not params:
        raise ValueError(f"lora.target_modules {cfg.target_modules} matched no layer of the UNet")
    return params


def save_lora(
    folder: Path,
    unet: UNet2DConditionModel,
    text_model: CLIPTextModel | None,
    text_model_2=None,
    sdxl: bool = False,
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` (diffusers' format, with each adapter's rank
    and alpha as metadata; SDXL's with the second text encoder's as well), atomically. The layers keep
    peft's names (``lora_A`` / ``lora_B``), which diffusers' loader reads as they are:
    ``convert_state_dict_to_diffusers`` renames attention projections only, and a file mixing its
    names with conv layers' peft names loses the attention adapters in diffusers' loader."""
    from peft.utils import get_peft_model_state_dict

    def layers_and_metadata(model):
        if model is None or not getattr(model, "peft_config", None):
            return None, None
        return get_peft_model_state_dict(model), model.peft_config["default"].to_dict()

    unet_layers, unet_meta = layers_and_metadata(unet)
    text_layers, text_meta = layers_and_metadata(text_model)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = {}
    if sdxl:
        text_2_layers, text_2_meta = layers_and_metadata(text_model_2)
        kwargs = {
            "text_encoder_2_lora_layers": text_2_layers,
            "text_encoder_2_lora_adapter_metadata": text_2_meta,
        }
    (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
        tmp,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=unet_meta,
        text_encoder_lora_adapter_metadata=text_meta,
        safe_serialization=True,
        **kwargs,
    )
    umask_permissions(tmp)  # safetensors writes 0600
    replace_dir(tmp, folder)
    return folder


def save_kohya_lora(
    path: Path, unet: UNet2DConditionModel, text_model: CLIPTextModel | None, text_model_2=None
) -> Path:
    """Write the adapters in kohya sd-scripts' key layout (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*``
    with ``lora_down`` / ``lora_up`` / ``alpha``), which ComfyUI, AUTOMATIC1111 and diffusers'
    ``load_lora_weights`` read: diffusers' ``convert_state_dict_to_kohya`` on the peft state dicts, with
    each module's ``alpha`` set to the adapter's own (diffusers writes alpha = rank). Atomic."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state: dict = {}
    alpha = None
    for prefix, model in (("unet", unet), ("text_encoder", text_model), ("text_encoder_2", text_model_2)):
        if model is None or not getattr(model, "peft_config", None):
            continue
        config = model.peft_config["default"]
        alpha = config.lora_alpha if alpha is None else alpha
        if config.lora_alpha != alpha:
            raise ValueError("kohya LoRA files carry one alpha per module; the adapters here disagree")
        state |= {f"{prefix}.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    kohya = convert_state_dict_to_kohya(state)
    kohya = {
        k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()
    }
    rank = next(v.shape[0] for k, v in kohya.items() if "lora_down" in k)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(kohya, str(tmp), metadata=metadata)
    umask_permissions(tmp)
    tmp.replace(path)
    return path


def save_peft_adapters(folder: Path, models: dict[str, nn.Module | None]) -> Path:
    """LoHa / LoKr adapters in peft's layout, one folder per adapted model (``PEFT_PARTS``):
    ``folder/<part>/adapter_model.safetensors`` (``get_peft_model_state_dict``) and
    ``adapter_config.json`` (the adapter's peft config: kind, rank, alpha, targets). Atomic."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for part, model in models.items():
        if model is None or not getattr(model, "peft_config", None):
            continue
        (tmp / part).mkdir(parents=True)
        state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, str(tmp / part / PEFT_WEIGHTS))
        model.peft_config["default"].save_pretrained(tmp / part)
    umask_permissions(tmp)
    replace_dir(tmp, folder)
    return folder


def is_peft_folder(path: Path) -> bool:
    """Whether ``path`` is an adapter folder in peft's layout (``save_peft_adapters``)."""
    return path.is_dir() and any((path / part / PEFT_CONFIG).is_file() for part in PEFT_PARTS)


def load_peft_adapters(
    folder: Path, models: dict[str, nn.Module | None], name: str, scale: float = 1.0
) -> None:
    """Add the adapters of a peft-layout folder to ``models`` (by part name) as adapter ``name``."""
    from peft import PeftConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    for part in PEFT_PARTS:
        if not (folder / part / PEFT_CONFIG).is_file():
            continue
        model = models.get(part)
        if model is None:
            raise ValueError(f"{folder / part} adapts a {part} that this pipeline does not have")
        config = PeftConfig.from_pretrained(folder / part)
        if hasattr(model, "add_adapter") and isinstance(model, UNet2DConditionModel):
            model.add_adapter(config, adapter_name=name)
        else:
            inject_adapter(model, config, name)
        result = set_peft_model_state_dict(model, load_file(folder / part / PEFT_WEIGHTS), adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{folder / part}: weights for no layer of the model, e.g. {unexpected[:3]}")
        model.requires_grad_(False)
        if scale != 1.0:
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and hasattr(module, "set_scale"):
                    module.set_scale(name, scale)
