"""OpenCLIP text tower -> ``transformers.CLIPTextModel``, so that it exports as a diffusers ``text_encoder/``.

Both are the CLIP text transformer (Radford et al. 2021): token + learned position embeddings, pre-norm
residual blocks x = x + Attn(LN1(x)); x = x + MLP(LN2(x)) under a causal mask, then a final LayerNorm.
The mapping, per block i (OpenCLIP -> transformers):

    token_embedding.weight            -> embeddings.token_embedding.weight
    positional_embedding              -> embeddings.position_embedding.weight
    resblocks.i.ln_1 / ln_2           -> encoder.layers.i.layer_norm1 / layer_norm2
    resblocks.i.attn.in_proj_{w,b}    -> encoder.layers.i.self_attn.{q,k,v}_proj (split in 3 along dim 0)
    resblocks.i.attn.out_proj         -> encoder.layers.i.self_attn.out_proj
    resblocks.i.mlp.c_fc / c_proj     -> encoder.layers.i.mlp.fc1 / fc2
    ln_final                          -> final_layer_norm

The text projection and the image tower are not needed for conditioning and are dropped. Covered: the
standard CLIP text tower (``CLIP`` and ``CustomTextCLIP`` with a ``TextTransformer``), with GELU,
tanh-GELU or QuickGELU. Not covered (``NotImplementedError``): Hugging Face text towers, custom
attention blocks (qk-norm, scaled cosine attention, ...), layer scale, a class token, no causal mask.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from conditioning.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE

logger = logging.getLogger(__name__)


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding OpenCLIP's text tower: ``model.text`` (CustomTextCLIP) or ``model`` itself (CLIP)."""
    tower = getattr(model, "text", None)
    if tower is not None and hasattr(tower, "transformer"):
        return tower
    if hasattr(model, "transformer") and hasattr(model, "token_embedding"):
        return model
    raise NotImplementedError(
        f"{type(model).__name__}: no OpenCLIP text transformer found (Hugging Face text towers are not supported)"
    )


def _activation_name(act: nn.Module) -> str:
    """The transformers ``hidden_act`` that computes the same function as OpenCLIP's MLP activation."""
    if type(act).__name__ == "QuickGELU":  # x * sigmoid(1.702 x), OpenAI CLIP
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    raise NotImplementedError(f"OpenCLIP text activation {act!r} has no transformers equivalent here")


def _check_supported(tower: nn.Module) -> None:
    if getattr(tower, "cls_emb", None) is not None:
        raise NotImplementedError("OpenCLIP text towers with a class token (embed_cls) are not supported")
    mask = getattr(tower, "attn_mask", None)
    n = tower.positional_embedding.shape[0]
    causal = torch.full((n, n), float("-inf")).triu(1)
    if mask is None or mask.shape != (n, n) or not torch.equal(mask.float().cpu(), causal):
        raise NotImplementedError(
            "the OpenCLIP text tower has no causal attention mask; CLIPTextModel is causal"
        )
    for i, block in enumerate(tower.transformer.resblocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or getattr(attn, "in_proj_weight", None) is None:
            raise NotImplementedError(f"text block {i}: custom attention blocks are not supported")
        if attn.bias_k is not None or attn.in_proj_bias is None:
            raise NotImplementedError(f"text block {i}: attention without the standard q/k/v biases")
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise NotImplementedError(f"text block {i}: layer scale (ls_init_value) is not supported")
        if hasattr(block, "ln_1_kv"):
            raise NotImplementedError(f"text block {i}: cross-attention blocks are not supported")
    eps = {m.eps for m in tower.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise NotImplementedError(f"the OpenCLIP text tower mixes LayerNorm eps values {sorted(eps)}")


def text_config_from_open_clip(tower: nn.Module) -> CLIPTextConfig:
    """The ``CLIPTextConfig`` of the same shape, activation and LayerNorm eps as OpenCLIP's text tower."""
    blocks = tower.transformer.resblocks
    width = tower.token_embedding.weight.shape[1]
    return CLIPTextConfig(
        vocab_size=tower.token_embedding.weight.shape[0],
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=tower.positional_embedding.shape[0],
        hidden_act=_activation_name(blocks[0].mlp.gelu),
        layer_norm_eps=tower.ln_final.eps,
        projection_dim=width,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )


def _copy_linear(dst: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    dst.weight.copy_(weight)
    dst.bias.copy_(bias)


def _copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)


@torch.no_grad()
def convert_open_clip_text(model: nn.Module) -> CLIPTextModel:
    """A float32 ``CLIPTextModel`` whose ``last_hidden_state`` equals OpenCLIP's token states after ``ln_final``.

    ``model`` is an OpenCLIP model (``open_clip.create_model(...)``); see the module docstring for coverage.
    """
    tower = text_tower(model)
    _check_supported(tower)
    if tower.token_embedding.weight.shape[0] != VOCAB_SIZE:
        raise NotImplementedError(
            f"OpenCLIP text vocabulary of {tower.token_embedding.weight.shape[0]} tokens; only the CLIP BPE "
            f"vocabulary ({VOCAB_SIZE}) is supported"
        )
    config = text_config_from_open_clip(tower)
    hf = CLIPTextModel(config).float().eval()
    body = getattr(hf, "text_model", hf)  # transformers < 5 nests the modules under .text_model
    body.embeddings.token_embedding.weight.copy_(tower.token_embedding.weight)
    body.embeddings.position_embedding.weight.copy_(tower.positional_embedding)
    for src, dst in zip(tower.transformer.resblocks, body.encoder.layers, strict=True):
        _copy_norm(dst.layer_norm1, src.ln_1)
        _copy_norm(dst.layer_norm2, src.ln_2)
        q_w, k_w, v_w = src.attn.in_proj_weight.chunk(3, dim=0)  # (3D, D) -> 3 x (D, D)
        q_b, k_b, v_b = src.attn.in_proj_bias.chunk(3, dim=0)
        _copy_linear(dst.self_attn.q_proj, q_w, q_b)
        _copy_linear(dst.self_attn.k_proj, k_w, k_b)
        _copy_linear(dst.self_attn.v_proj, v_w, v_b)
        _copy_linear(dst.self_attn.out_proj, src.attn.out_proj.weight, src.attn.out_proj.bias)
        _copy_linear(dst.mlp.fc1, src.mlp.c_fc.weight, src.mlp.c_fc.bias)
        _copy_linear(dst.mlp.fc2, src.mlp.c_proj.weight, src.mlp.c_proj.bias)
    _copy_norm(body.final_layer_norm, tower.ln_final)
    logger.info(
        "converted the OpenCLIP text tower: %d layers, width %d, %s",
        config.num_hidden_layers,
        config.hidden_size,
        config.hidden_act,
    )
    return hf


def load_open_clip_text(name: str, pretrained: str | None) -> CLIPTextModel:
    """``open_clip.create_model(name, pretrained)`` on the CPU, with its text tower converted."""
    import open_clip  # slow to import: only when an OpenCLIP encoder is asked for

    model_cfg = open_clip.get_model_config(name)
    text_cfg = (model_cfg or {}).get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise NotImplementedError(
            f"OpenCLIP model {name!r} uses a Hugging Face text tower or tokenizer; only CLIP-BPE text "
            "transformers (ViT-B-32, ViT-L-14, ViT-H-14, ViT-bigG-14, ...) convert to CLIPTextModel"
        )
    if pretrained is None and not name.startswith(("hf-hub:", "local-dir:")):
        logger.warning(
            "text.pretrained is not set: the OpenCLIP text tower of %s is randomly initialized", name
        )
    model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
    return convert_open_clip_text(model)  # the image tower and projections go with `model`
