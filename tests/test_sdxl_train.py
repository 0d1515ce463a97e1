"""Fine-tuning a tiny SDXL folder built with diffusers and transformers classes: full and LoRA (UNet and
both text encoders) on mixed sizes with buckets; v-prediction with zero terminal SNR; micro-conditioning
in the data and the latent cache."""

import json
import logging

import numpy as np
import pytest
import torch
from conftest import finetune_config as shared_finetune_config
from conftest import save_tiny_sdxl_pipeline
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from conditioning.conditioner import unreached_parameters
from ldm.core.config import load_config
from ldm.data.cache import encode_dataset
from ldm.data.shapes import ShapesDataset
from ldm.data.transforms import ImageTransform
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.samplers import make_scheduler
from ldm.train.config import LDMRunConfig
from ldm.train.diffusion import train_ldm

PROMPT = "a red circle on a black background"


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def finetune_config(out, pretrained, data, *extra) -> LDMRunConfig:
    return shared_finetune_config(out, pretrained, data, "preflight.samples=0", *extra)


def diffusers_image(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)  # the same sampler as ours
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, latents=latents, output_type="pt").images


def test_full_sdxl_finetune_with_buckets(tmp_path, sdxl_folder, mixed_folder, caplog):
    caplog.set_level(logging.INFO, logger="ldm")
    out = train_ldm(finetune_config(tmp_path / "full", sdxl_folder, mixed_folder))
    assert "aspect-ratio buckets" in caplog.text and "scaled_linear" in caplog.text
    tuned = StableDiffusionXLPipeline.from_pretrained(out / "model")  # diffusers loads the export as it is
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    assert tuned.unet.config.addition_embed_type == "text_time"
    assert any(
        not torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), base.unet.parameters(), strict=True)
    )
    for name in ("vae", "text_encoder", "text_encoder_2"):  # frozen
        for a, b in zip(getattr(tuned, name).parameters(), getattr(base, name).parameters(), strict=True):
            assert torch.equal(a, b), name
    assert (diffusers_image(tuned) - diffusers_image(base)).abs().max() > 1e-3


def test_sdxl_lora_on_unet_and_both_text_encoders(tmp_path, sdxl_folder, mixed_folder):
    cfg = finetune_config(tmp_path / "lora", sdxl_folder, mixed_folder, "lora.rank=4", "lora.alpha=8",
                          "lora.text_encoder=true", "lora.merge=true", "lora.format=both")  # fmt: skip
    out = train_ldm(cfg)
    from safetensors import safe_open

    with safe_open(out / "lora" / "pytorch_lora_weights.safetensors", "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}  # diffusers' SDXL LoRA layout

    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    before = diffusers_image(theirs)
    theirs.load_lora_weights(out / "lora")
    after = diffusers_image(theirs)
    assert (after - before).abs().max() > 1e-3  # the adapters change the output

    ours = LatentDiffusionPipeline.from_pretrained(sdxl_folder, channels_last=False)
    ours.load_lora_weights(out / "lora")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    mine = ours(
        PROMPT, num_inference_steps=3, guidance_scale=3.0, sampler="ddim", latents=latents, output_type="pt"
    )
    torch.testing.assert_close(mine.images, after, rtol=0, atol=1e-4)

    merged = StableDiffusionXLPipeline.from_pretrained(out / "model")  # lora.merge=true: adapters fused
    torch.testing.assert_close(diffusers_image(merged), after, rtol=0, atol=1e-4)

    with safe_open(out / "lora" / "kohya_lora.safetensors", "pt") as f:  # lora.format=both
        assert {k.split("_")[1] for k in f.keys()} == {"unet", "te1", "te2"}
    kohya = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    kohya.load_lora_weights(out / "lora", weight_name="kohya_lora.safetensors")
    torch.testing.assert_close(diffusers_image(kohya), after, rtol=0, atol=1e-4)


def test_v_prediction_zero_terminal_snr_sdxl_trains_on_its_own_schedule(tmp_path, mixed_folder, caplog):
    caplog.set_level(logging.INFO, logger="ldm")
    folder = save_tiny_sdxl_pipeline(
        tmp_path / "vpred", prediction_type="v_prediction", zero_terminal_snr=True
    )
    out = train_ldm(finetune_config(tmp_path / "run", folder, mixed_folder, "train.max_steps=3"))
    assert "predicts v_prediction" in caplog.text
    saved = json.loads((out / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction" and saved["rescale_betas_zero_snr"] is True
    assert saved["timestep_spacing"] == "trailing"  # zero terminal SNR samples from t = T
    config = (out / "config.yaml").read_text()
    assert "prediction_type: v_prediction" in config and "zero_terminal_snr: true" in config
    tuned = StableDiffusionXLPipeline.from_pretrained(out / "model")
    assert np.isfinite(diffusers_image(tuned).numpy()).all()


def test_transform_reports_size_and_crop():
    image = Image.new("RGB", (100, 50))
    pixels, micro = ImageTransform(32, crop="random").apply(image, torch.Generator().manual_seed(0))
    assert pixels.shape == (3, 32, 32) and micro["original_size"].tolist() == [50, 100]
    top, left = micro["crop_top_left"].tolist()
    assert top == 0 and 0 <= left <= 64 - 32  # resized to 64 x 32, cropped to 32 x 32
    _, centered = ImageTransform(32).apply(image)
    assert centered["crop_top_left"].tolist() == [0, 16]


def test_shapes_crop_margin_varies_size_and_crop_and_the_cache_keeps_them(tiny_vae_module):
    shapes = ShapesDataset(64, resolution=16, crop_margin=4)
    sizes = torch.stack([shapes[i]["original_size"] for i in range(64)])
    crops = torch.stack([shapes[i]["crop_top_left"] for i in range(64)])
    assert 16 in sizes[:, 0].tolist() and sizes.max() > 16 and sizes.max() <= 20
    assert (crops <= (sizes - 16)).all() and crops.max() > 0
    assert ShapesDataset(8, resolution=16)[3]["original_size"].tolist() == [16, 16]
    cached = encode_dataset(tiny_vae_module, shapes, batch_size=16)
    assert torch.equal(torch.stack([cached[i]["crop_top_left"] for i in range(64)]), crops)


@pytest.fixture(scope="module")
def tiny_vae_module():
    from conftest import tiny_autoencoder

    return tiny_autoencoder(scaling_factor=0.8)


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory, tiny_vae_module):
    folder = tmp_path_factory.mktemp("vae") / "model"
    tiny_vae_module.save_pretrained(folder)
    return folder


SCRATCH_XL = [
    "conditioner=sdxl", "data.resolution=16", "data.train_size=64", "data.val_size=8", "data.crop_margin=4",
    "unet.block_out_channels=[32,32]", "unet.norm_num_groups=8", "unet.addition_time_embed_dim=8",
    "text.hidden_size=32", "text.num_heads=2", "text.intermediate_size=64",
    "text_2.hidden_size=32", "text_2.num_heads=2", "text_2.intermediate_size=64",
    "train.batch_size=4", "train.compile=false", "train.max_steps=4", "train.lr_warmup_steps=0", "train.log_every=1",
    "train.sample_every=0", "train.checkpoint_every=0", "sample.steps=2", "sample.grid_prompts=1",
    "sample.grid_seeds=1", "eval.num_samples=4", "eval.seeds_per_prompt=2", "eval.batch_size=4",
    "eval.bound_strata=5", "eval.timestep_points=4", "preflight.samples=0",
]  # fmt: skip


@pytest.mark.parametrize("objective", ["ddpm", "rectified_flow"])
def test_sdxl_from_scratch_exports_an_sdxl_folder(tmp_path, tiny_vae_folder, objective):
    extra = ["noise.objective=rectified_flow", "sample.sampler=flow-euler"] if objective != "ddpm" else []
    cfg = load_config(
        LDMRunConfig, None, [f"output_dir={tmp_path}", f"vae={tiny_vae_folder}", *SCRATCH_XL, *extra]
    )
    out = train_ldm(cfg)
    results = json.loads((out / "eval.json").read_text())
    assert (results["bpd"] is None) == (objective != "ddpm")  # the bound is a DDPM quantity
    theirs = StableDiffusionXLPipeline.from_pretrained(out / "model")  # loads as it is
    assert (
        theirs.unet.config.addition_embed_type == "text_time"
        and theirs.text_encoder_2.config.projection_dim == 32
    )
    ours = LatentDiffusionPipeline.from_pretrained(out / "model")
    assert ours.is_sdxl and ours.objective.name == objective
    images = ours(["a red circle on a black background"] * 2, num_inference_steps=2, seed=0, output_type="np",
                  crops_coords_top_left=(0, 0), progress=False).images  # fmt: skip
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_sdxl_lora_under_bf16_keeps_frozen_weights_half_and_adapters_float32(
    tmp_path, sdxl_folder, mixed_folder, monkeypatch, fresh_accelerate_state
):
    import ldm.train.setup as setup_module

    seen = {}
    cast = setup_module.cast_frozen

    def recorded(cfg, unet, conditioner, trainable):
        cast(cfg, unet, conditioner, trainable)
        seen["base"] = {p.dtype for n, p in unet.named_parameters() if "lora_" not in n}
        seen["text"] = {
            p.dtype for e in conditioner.encoders for n, p in e.model.named_parameters() if "lora_" not in n
        }
        seen["adapters"] = {p.dtype for p in trainable}
        unreached = {id(p) for p in unreached_parameters(conditioner.encoders[0])}
        seen["unreached trained"] = sum(id(p) in unreached for p in trainable)
        seen["unreached"] = len(unreached)

    monkeypatch.setattr(setup_module, "cast_frozen", recorded)
    cfg = finetune_config(tmp_path, sdxl_folder, mixed_folder, "lora.rank=2", "lora.text_encoder=true",
                          "train.mixed_precision=bf16", "train.max_steps=2", "train.optimizer=adafactor",
                          "lora.merge=true")  # fmt: skip
    out = train_ldm(cfg)
    unreached = seen.pop("unreached")
    assert (
        unreached > 0 and seen.pop("unreached trained") == 0
    )  # adapters past hidden_states[-2] do not train
    assert seen == {"base": {torch.bfloat16}, "text": {torch.bfloat16}, "adapters": {torch.float32}}
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    merged = StableDiffusionXLPipeline.from_pretrained(
        out / "model"
    )  # exported in float32, as diffusers runs it
    assert {merged.unet.dtype, merged.text_encoder.dtype, merged.text_encoder_2.dtype} == {torch.float32}
    assert torch.isfinite(diffusers_image(merged)).all()


def test_sdxl_img2img_inpainting_and_tiled_decoding_run(sdxl_folder):
    pipe = LatentDiffusionPipeline.from_pretrained(sdxl_folder)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1  # generate the left half
    kw = {"num_inference_steps": 4, "seed": 0, "output_type": "pt_signed", "progress": False}
    latent_kw = {**kw, "output_type": "latent"}
    known = pipe.encode_images(image)  # (1, 4, 16, 16)
    low = pipe.img2img(PROMPT, image, strength=0.25, **latent_kw).images
    high = pipe.img2img(PROMPT, image, strength=1.0, **latent_kw).images
    assert (low - known).abs().mean() < (high - known).abs().mean()  # low strength stays nearer the image
    painted = pipe.inpaint(PROMPT, image, mask, **latent_kw).images
    torch.testing.assert_close(
        painted[..., 10:], known[..., 10:], rtol=0, atol=1e-5
    )  # the right half is kept
    assert (painted[..., :6] - known[..., :6]).abs().mean() > 0.1  # the left half is generated
    plain = pipe(PROMPT, height=64, width=64, **kw).images
    pipe.enable_vae_tiling(tile_size=32)
    torch.testing.assert_close(pipe(PROMPT, height=64, width=64, **kw).images, plain, rtol=0, atol=1e-4)


def test_dry_run_memory_estimate_counts_what_trains(tmp_path, tiny_vae_folder, sdxl_folder, capsys):
    from ldm.cli.train_ldm import dry_run_models, main

    def estimate(*extra):
        base = [f"output_dir={tmp_path}", f"vae={tiny_vae_folder}", *SCRATCH_XL]
        return dry_run_models(load_config(LDMRunConfig, None, [*base, *extra]))

    models, full = estimate()
    counted = sum(p.numel() for name, m in models.items() if name != "autoencoder" for p in m.parameters())
    assert full.trained_parameters == counted  # the UNet and both scratch encoders train
    assert (
        full.gradients == 4 * counted and full.optimizer == 8 * counted
    )  # float32 grads, AdamW's two moments
    assert full.ema == 4 * counted  # train.ema_decay defaults to 0.999: a float32 copy
    _, adafactor = estimate("train.optimizer=adafactor")
    assert 0 < adafactor.optimizer < full.optimizer / 2
    _, checkpointed = estimate("unet.gradient_checkpointing=true")
    assert 0 < checkpointed.activations_per_image < full.activations_per_image
    _, bigger = estimate("data.resolution=32")
    assert (
        bigger.activations_per_image > 1.5 * full.activations_per_image
    )  # 4x the pixels (some costs are fixed)
    # a pretrained SDXL folder under LoRA and bf16: adapters only train, the frozen weights count 2 bytes each
    cfg = finetune_config(tmp_path, sdxl_folder, "unused", "lora.rank=4", "train.mixed_precision=bf16")
    models, lora = dry_run_models(cfg)
    frozen = sum(p.numel() for name, m in models.items() if name != "autoencoder" for p in m.parameters())
    assert 0 < lora.trained_parameters < frozen / 10
    vae = sum(p.numel() for p in models["autoencoder"].parameters())
    assert lora.weights == 2 * (frozen - lora.trained_parameters) + 4 * lora.trained_parameters + 4 * vae
    # textual inversion: the new token's rows in both encoders train, nothing else
    models, ti = dry_run_models(
        finetune_config(tmp_path, sdxl_folder, "unused", "ti.tokens=['<x>']", "ti.init=[cat]")
    )
    widths = sum(m.model.config.hidden_size for name, m in models.items() if name.startswith("text encoder"))
    assert ti.trained_parameters == widths
    assert (
        main(
            [
                "--config",
                "configs/ldm/sdxl-lora.yaml",
                f"pretrained={sdxl_folder}",
                "data.path=unused",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "memory estimate" in out and "activations:" in out and "text encoder 2 (frozen)" in out


def test_optimizer_state_estimate_equals_the_real_optimizers_state():
    from ldm.train.memory_estimate import optimizer_state_bytes
    from ldm.training.optim import make_optimizer

    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(8, 4, 3, 3), (16, 8), (5,)]]
    for name in ("adamw", "adafactor"):
        optimizer = make_optimizer(name, params, 1e-3, (0.9, 0.999), 0.0)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        state = sum(
            v.numel() * v.element_size()
            for s in optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and v.ndim > 0
        )  # fmt: skip
        assert optimizer_state_bytes(name, params) == state, name
