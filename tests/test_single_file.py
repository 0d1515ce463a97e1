"""Single-file checkpoints: the original Stable Diffusion key layout, written and read back.

The layout is checked against diffusers' single-file loader: on the full SD 1.5, SD 2 and SDXL
architectures (meta tensors: shapes, no memory) diffusers infers the right model type from our keys
and its converters give back every weight of each model; on tiny models, ``from_single_file`` loads
our file to the same images as the folder.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import finetune_config, save_tiny_sd_pipeline, save_tiny_sdxl_pipeline

from ldm.core.errors import ModelError
from ldm.models.single_file import LayoutError, hf_clip_names, unet_to_original
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.single_file import CONFIG_KEY, SINGLE_FILE, original_state_dict

VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
SD_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)  # fmt: skip
ARCHITECTURES = {  # the published configs of SD 1.5, SD 2.x and SDXL 1.0 base
    "v1": dict(unet=dict(SD_UNET, cross_attention_dim=768, attention_head_dim=8),
               text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="quick_gelu")]),
    "v2": dict(unet=dict(SD_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                         use_linear_projection=True),
               text=[dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                          hidden_act="gelu")]),
    "xl_base": dict(unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                              down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                              up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                              attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                              cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                              addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
                    text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               hidden_act="quick_gelu"),
                          dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                               hidden_act="gelu", projection_dim=1280)]),
}  # fmt: skip


def meta_pipeline(arch: str) -> SimpleNamespace:
    """The architecture's networks on the meta device, as ``original_state_dict`` reads a pipeline."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = ARCHITECTURES[arch]
    with init_empty_weights():
        texts = [CLIPTextModel(CLIPTextConfig(**spec["text"][0]))]
        if len(spec["text"]) > 1:
            texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**spec["text"][1])))
        return SimpleNamespace(
            unet=UNet2DConditionModel(**spec["unet"]),
            vae=AutoencoderKL(**VAE),
            text_encoder=texts[0],
            text_encoder_2=texts[1] if len(texts) > 1 else None,
            is_sdxl=len(texts) > 1,
        )


def same_shapes(converted: dict, model: torch.nn.Module, text: bool = False) -> None:
    expected = hf_clip_names(model.state_dict()) if text else model.state_dict()
    assert sorted(converted) == sorted(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_key_layout_is_what_diffusers_single_file_loader_reads(arch):
    from diffusers.loaders import single_file_utils as su

    pipe = meta_pipeline(arch)
    state = original_state_dict(pipe)
    assert su.infer_diffusers_model_type(state) == arch  # diffusers' CHECKPOINT_KEY_NAMES and shapes
    clip_key = {"v1": "clip", "v2": "open_clip", "xl_base": "clip_sdxl"}[arch]
    assert su.CHECKPOINT_KEY_NAMES[clip_key] in state
    if arch == "xl_base":
        assert su.CHECKPOINT_KEY_NAMES["open_clip_sdxl"] in state
    # the loading direction gives back every weight of every network, and nothing else
    same_shapes(su.convert_ldm_unet_checkpoint(state, dict(pipe.unet.config)), pipe.unet)
    same_shapes(su.convert_ldm_vae_checkpoint(state, dict(pipe.vae.config)), pipe.vae)
    if arch == "v2":
        same_shapes(su.convert_open_clip_checkpoint(pipe.text_encoder, state), pipe.text_encoder, text=True)
    else:
        same_shapes(su.convert_ldm_clip_checkpoint(state), pipe.text_encoder, text=True)
    if arch == "xl_base":
        tower = su.convert_open_clip_checkpoint(
            pipe.text_encoder_2, state, prefix="conditioner.embedders.1.model."
        )
        same_shapes(tower, pipe.text_encoder_2, text=True)
    # and nothing else: one key per weight, but OpenCLIP's q, k, v (weights and biases) fused 3 -> 1
    towers = [pipe.text_encoder_2] if pipe.is_sdxl else ([pipe.text_encoder] if arch == "v2" else [])
    models = [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if pipe.is_sdxl else [])
    weights = sum(len(m.state_dict()) for m in models)
    assert len(state) == weights - sum(4 * t.config.num_hidden_layers for t in towers)


def test_weights_come_back_unchanged_through_diffusers_converters(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as su

    folder = save_tiny_sd_pipeline(tmp_path / "sd")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    for ours, model in (
        (su.convert_ldm_unet_checkpoint(unet_to_original(unet.state_dict(), dict(unet.config)), dict(unet.config)), unet),
        (su.convert_ldm_vae_checkpoint(original_state_dict(SimpleNamespace(
            unet=unet, vae=vae, text_encoder=LatentDiffusionPipeline.from_pretrained(folder).text_encoder,
            is_sdxl=False)), dict(vae.config)), vae),
    ):  # fmt: skip
        for key, value in model.state_dict().items():
            assert torch.equal(ours[key], value), key


def test_unet_the_layout_cannot_hold_is_an_error():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=(1, 2), norm_num_groups=8, cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        )  # fmt: skip
    with pytest.raises(LayoutError, match="layers_per_block"):
        unet_to_original(unet.state_dict(), dict(unet.config))


def images(pipe, **kw) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 12, 12)
    latents = torch.randn(shape, generator=g)
    g.manual_seed(1)  # DDPM's steps draw noise too
    return pipe("a red circle", num_inference_steps=3, latents=latents, generator=g, output_type="np",
                height=24, width=24, **kw).images  # fmt: skip


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_single_file_loads_in_diffusers_to_the_same_images(tmp_path, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sd":
        folder, cls = save_tiny_sd_pipeline(tmp_path / "model"), StableDiffusionPipeline
    else:  # the encoders as wide as in SDXL apart (diffusers' from_single_file tells them apart by width)
        folder, cls = save_tiny_sdxl_pipeline(tmp_path / "model", width_2=48), StableDiffusionXLPipeline
    ours = LatentDiffusionPipeline.from_pretrained(folder)
    path = ours.save_single_file(tmp_path / "model.safetensors")
    half = ours.save_single_file(tmp_path / "model-fp16.safetensors", "fp16")
    assert 0.49 < half.stat().st_size / path.stat().st_size < 0.51

    reference = cls.from_pretrained(folder)
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    loaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **extra)
    np.testing.assert_allclose(images(loaded), images(reference), atol=1e-4)

    # our loader: the configs from the file's own metadata, no folder needed
    again = LatentDiffusionPipeline.from_pretrained(path)
    assert again.is_sdxl == (kind == "sdxl")
    first = ours("a red circle", seed=3, num_inference_steps=3, output_type="np", progress=False).images
    second = again("a red circle", seed=3, num_inference_steps=3, output_type="np", progress=False).images
    np.testing.assert_allclose(second, first, atol=1e-4)
    assert again.tokenizer("a red circle!").input_ids == ours.tokenizer("a red circle!").input_ids


def test_sdxl_encoders_of_one_width_load_to_their_own_weights(tmp_path):
    folder = save_tiny_sdxl_pipeline(tmp_path / "model")  # both encoders 32 wide
    ours = LatentDiffusionPipeline.from_pretrained(folder)
    again = LatentDiffusionPipeline.from_pretrained(ours.save_single_file(tmp_path / "m.safetensors"))
    for a, b in ((ours.text_encoder, again.text_encoder), (ours.text_encoder_2, again.text_encoder_2)):
        for key, value in a.state_dict().items():
            assert torch.equal(b.state_dict()[key], value), key


def test_foreign_file_without_configs_says_what_to_pass(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny_sd_pipeline(tmp_path / "model")
    path = LatentDiffusionPipeline.from_pretrained(folder).save_single_file(tmp_path / "ours.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(path), str(foreign))  # the same weights, without ldm's metadata
    with pytest.raises(ModelError, match="config=FOLDER"):
        LatentDiffusionPipeline.from_pretrained(foreign)
    pipe = LatentDiffusionPipeline.from_pretrained(foreign, config=folder)
    assert tuple(pipe.unet.config.block_out_channels) == (32, 32)
    with pytest.raises(ModelError, match="no single-file checkpoint"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "missing.safetensors")


def test_export_cli_writes_and_reads_single_files(tmp_path):
    from ldm.cli.export import main

    folder = save_tiny_sd_pipeline(tmp_path / "model")
    assert main([str(folder), "--single-file", str(tmp_path / "m.safetensors"), "--dtype", "fp16"]) == 0
    assert main([str(tmp_path / "m.safetensors"), "--folder", str(tmp_path / "back")]) == 0
    back = LatentDiffusionPipeline.from_pretrained(tmp_path / "back")  # a diffusers folder again
    original = LatentDiffusionPipeline.from_pretrained(folder)
    for a, b in (
        (original.unet, back.unet),
        (original.vae, back.vae),
        (original.text_encoder, back.text_encoder),
    ):
        for key, value in a.state_dict().items():  # the same weights, to fp16 rounding
            torch.testing.assert_close(b.state_dict()[key].float(), value, rtol=1e-3, atol=1e-3)


def test_fine_tune_from_a_single_file_and_export_one(tmp_path, mixed_folder):
    from ldm.train.diffusion import train_ldm

    folder = save_tiny_sd_pipeline(tmp_path / "base")
    source = LatentDiffusionPipeline.from_pretrained(folder).save_single_file(tmp_path / "base.safetensors")
    cfg = finetune_config(
        tmp_path / "run", source, mixed_folder, "export.single_file=true", "export.dtype=fp16"
    )
    out = train_ldm(cfg)
    record = json.loads((out / "pretrained" / "source.json").read_text())
    assert record["size"] == source.stat().st_size
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5
    tuned = LatentDiffusionPipeline.from_pretrained(out / SINGLE_FILE)
    folder_model = LatentDiffusionPipeline.from_pretrained(out / "model")
    for key, value in folder_model.unet.state_dict().items():
        assert torch.allclose(tuned.unet.state_dict()[key].float(), value, atol=1e-2), key
    from safetensors import safe_open

    with safe_open(str(out / SINGLE_FILE), "pt") as f:
        assert CONFIG_KEY in f.metadata()
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16


def test_what_the_layout_cannot_hold_is_refused_with_what_to_do():
    from ldm.core.config import ConfigError, load_config
    from ldm.train.config import LDMRunConfig

    pipe = meta_pipeline("v2")
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():  # OpenCLIP ViT-H whole: SD 2 readers would drop its last layer
        pipe.text_encoder = CLIPTextModel(
            CLIPTextConfig(**dict(ARCHITECTURES["v2"]["text"][0], num_hidden_layers=24))
        )
    with pytest.raises(LayoutError, match="24 layers"):
        original_state_dict(pipe)
    with pytest.raises(LayoutError, match="fuse"):  # unfused LoRA layers
        unet_to_original(
            {"down_blocks.0.attentions.0.to_q.base_layer.weight": torch.zeros(1)}, {"layers_per_block": 1}
        )
    with pytest.raises(ConfigError, match="lora.merge=true"):
        load_config(LDMRunConfig, None, ["export.single_file=true", "lora.rank=4"])


def test_written_files_follow_the_umask(tmp_path):
    import os
    import stat

    folder = save_tiny_sd_pipeline(tmp_path / "model")
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    old = os.umask(0o022)
    try:
        path = pipe.save_single_file(tmp_path / "m.safetensors")
        saved = pipe.save_pretrained(tmp_path / "again")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # safetensors alone writes 0600
    weights = next((saved / "unet").glob("*.safetensors"))
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
