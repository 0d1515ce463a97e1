"""The original Stable Diffusion key layout (CompVis / Stability ``.safetensors``), from diffusers weights.

Single-file checkpoints hold the UNet under ``model.diffusion_model.``, the autoencoder under
``first_stage_model.`` and the text encoders under ``cond_stage_model.`` (SD 1.x: OpenAI CLIP in
Hugging Face names; SD 2.x: OpenCLIP names) or, for SDXL, ``conditioner.embedders.0.transformer.``
(CLIP ViT-L, Hugging Face names) and ``conditioner.embedders.1.model.`` (OpenCLIP ViT-bigG). This
is the layout ComfyUI, AUTOMATIC1111, kohya sd-scripts and diffusers' ``from_single_file`` read.

diffusers has these maps in the loading direction only (``diffusers.loaders.single_file_utils``:
``DIFFUSERS_TO_LDM_MAPPING`` and the ``convert_ldm_*`` functions). The functions here invert them:
the fixed layer names come from diffusers' own table, the block indices from the arithmetic of
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` run backwards. The tests feed our
output to those diffusers converters and get every weight back unchanged.

Each function takes a module's ``state_dict()`` and returns a new dict of the same tensors (no
copies, except the VAE attention weights made 1x1 convolutions and OpenCLIP's fused q/k/v).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

from ldm.core.errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

# sub-layer names inside a UNet resnet: diffusers -> original (inverse of update_unet_resnet_ldm_to_diffusers)
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# VAE attention: diffusers -> original (inverse of update_vae_attentions_ldm_to_diffusers)
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# OpenCLIP transformer sub-layers: diffusers -> original (DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"])
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


class LayoutError(ModelError):
    """A model the original layout has no place for (or a layout this module does not know)."""


ADAPTER_MARKS = (".base_layer.", ".lora_A.", ".lora_B.", ".lora_embedding_", ".lora_magnitude_")


def check_no_adapters(state: dict[str, torch.Tensor], what: str) -> None:
    """Unfused LoRA (peft) layers have no place in the layout: fuse them first."""
    found = [k for k in state if any(mark in k for mark in ADAPTER_MARKS)]
    if found:
        raise LayoutError(
            f"the {what} has unfused LoRA layers ({found[0]}, ...): fuse them into the weights first "
            "(pipe.fuse_lora(); or train with lora.merge=true), or export the adapters with lora.format"
        )


def _rename(prefix_map: list[tuple[str, str]], sub_map: dict[str, str], key: str) -> str | None:
    """``key`` with the first matching diffusers block prefix replaced by the original one, and its
    first sub-layer name mapped through ``sub_map``; None when no prefix matches."""
    for new, old in prefix_map:
        if key.startswith(new + "."):
            rest = key[len(new) + 1 :]
            for d_name, o_name in sub_map.items():
                if rest.startswith(d_name + "."):
                    rest = o_name + rest[len(d_name) :]
                    break
            return f"{old}.{rest}"
    return None


def _mapped(state: dict[str, torch.Tensor], rename, prefix: str, what: str) -> dict[str, torch.Tensor]:
    """``{prefix + name: value}`` for each ``(name, value) = rename(key, value)``; an error naming the
    keys ``rename`` has no name for (None)."""
    out, left = {}, []
    for key, value in state.items():
        name, value = rename(key, value)
        if name is None:
            left.append(key)
        else:
            out[prefix + name] = value
    if left:
        raise _unmapped(what, left)
    return out


def _unmapped(what: str, left: list[str]) -> LayoutError:
    shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
    return LayoutError(
        f"the {what} has weights the original Stable Diffusion layout has no place for: {shown}"
    )


def unet_block_prefixes(config: dict[str, Any], has_attention: set[str]) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) for each resnet, attention and resampler of the UNet.

    ``convert_ldm_unet_checkpoint`` backwards: down block b, layer j is ``input_blocks.{1 + b(L+1) + j}``
    (L = layers_per_block; its downsampler is the block's last index, ``.0.op``); up block b, layer j
    is ``output_blocks.{b(L+1) + j}`` (upsampler after the block's attention: ``.1.conv`` or ``.2.conv``);
    the middle is resnet, attention, resnet. ``has_attention``: the diffusers blocks with attentions
    (e.g. ``up_blocks.0``).
    """
    per = config["layers_per_block"]
    if not isinstance(per, int):  # a list: fine when all blocks have the same count
        if len(set(per)) != 1:
            raise LayoutError(
                f"layers_per_block={list(per)}: the original layout needs one count for all blocks"
            )
        per = per[0]
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise LayoutError(
            f"mid_block_type={config['mid_block_type']}: the original layout needs a cross-attention middle"
        )
    pairs = []
    for b in range(len(config["down_block_types"])):
        for j in range(per):
            i = 1 + b * (per + 1) + j
            pairs += [(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0")]
            pairs += [(f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1")]
        pairs += [(f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{1 + b * (per + 1) + per}.0.op")]
    pairs += [("mid_block.resnets.0", "middle_block.0"), ("mid_block.attentions.0", "middle_block.1")]
    pairs += [("mid_block.resnets.1", "middle_block.2")]
    for b in range(len(config["up_block_types"])):
        for j in range(per + 1):
            i = b * (per + 1) + j
            pairs += [(f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0")]
            pairs += [(f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1")]
        slot = 2 if f"up_blocks.{b}" in has_attention else 1
        pairs += [(f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{b * (per + 1) + per}.{slot}.conv")]
    return pairs


def unet_to_original(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel`` state dict in the original layout (``model.diffusion_model.*``)."""
    check_no_adapters(state, "UNet")
    layers = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled text + size/crop embedding
        layers.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    attention = {
        ".".join(k.split(".")[:2]) for k in state if ".attentions." in k and k.startswith("up_blocks.")
    }
    blocks = unet_block_prefixes(config, attention)

    def rename(key: str, value: torch.Tensor) -> tuple[str | None, torch.Tensor]:
        name = layers.get(key) or _rename(blocks, UNET_RESNET if ".resnets." in key else {}, key)
        return name, value

    return _mapped(state, rename, UNET_PREFIX, "UNet")


def vae_to_original(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` state dict in the original layout (``first_stage_model.*``): the decoder's up
    blocks in reverse order, attention projections as 1x1 convolutions (``convert_ldm_vae_checkpoint``
    backwards)."""
    layers = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n = len(config["up_block_types"])
    blocks = []
    for i in range(len(config["down_block_types"])):
        blocks += [(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block")]
        blocks += [(f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample")]
    for i in range(n):
        blocks += [(f"decoder.up_blocks.{i}.resnets", f"decoder.up.{n - 1 - i}.block")]
        blocks += [(f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{n - 1 - i}.upsample")]
    for part in ("encoder", "decoder"):
        blocks += [(f"{part}.mid_block.resnets.{k}", f"{part}.mid.block_{k + 1}") for k in range(2)]
        blocks += [(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1")]

    def rename(key: str, value: torch.Tensor) -> tuple[str | None, torch.Tensor]:
        if key in layers:
            return layers[key], value
        attn = ".mid_block.attentions." in key
        name = _rename(blocks, VAE_ATTENTION if attn else {}, key)
        if name is not None and not attn:
            name = name.replace(".conv_shortcut.", ".nin_shortcut.")
        if attn and name is not None and value.ndim == 2:  # linear -> 1x1 convolution
            value = value[:, :, None, None]
        return name, value

    return _mapped(state, rename, VAE_PREFIX, "autoencoder")


def hf_clip_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text model's state dict with the ``text_model.`` names of the Hugging Face checkpoints
    (transformers 5 saves ``CLIPTextModel`` without that prefix, ``CLIPTextModelWithProjection`` with it)."""
    keep = ("text_model.", "text_projection.")
    return {(k if k.startswith(keep) else "text_model." + k): v for k, v in state.items()}


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in the SD 1.x / SDXL-first-encoder layout: the Hugging Face
    names (``text_model.*``) under ``prefix`` (``convert_ldm_clip_checkpoint`` only strips it)."""
    check_no_adapters(state, "text encoder")
    return {prefix + key: value for key, value in hf_clip_names(state).items()}


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in OpenCLIP's names (SD 2.x, SDXL's second encoder), under
    ``prefix``: q/k/v fused into ``attn.in_proj_*``, ``text_projection`` transposed
    (``convert_open_clip_checkpoint`` backwards)."""
    check_no_adapters(state, "text encoder")
    layers = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out, left = {}, []
    fused: dict[str, dict[str, torch.Tensor]] = {}
    head = "text_model.encoder.layers."
    for key, value in hf_clip_names(state).items():
        if key in layers:
            out[prefix + layers[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        if not key.startswith(head):
            left.append(key)
            continue
        index, _, rest = key[len(head) :].partition(".")
        block = f"{prefix}transformer.resblocks.{index}."
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            _, proj, kind = rest.split(".")
            fused.setdefault(f"{block}attn.in_proj_{kind}", {})[proj] = value
            continue
        rest = rest.replace("self_attn.out_proj.", "attn.out_proj.")
        for d_name, o_name in OPEN_CLIP_LAYER.items():
            if rest.startswith(d_name + "."):
                rest = o_name + rest[len(d_name) :]
        out[block + rest] = value
    for name, parts in fused.items():
        if sorted(parts) != ["k_proj", "q_proj", "v_proj"]:
            left.append(name)
            continue
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    if left:
        raise _unmapped("text encoder", left)
    return out
