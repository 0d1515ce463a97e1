"""Fine-tuning a tiny Stable Diffusion folder built with diffusers classes: full and LoRA, buckets."""

import logging

import pytest
import torch
from conftest import finetune_config, save_tiny_sd_pipeline
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from ldm.core.config import load_config
from ldm.core.errors import ConfigError
from ldm.data import build_dataset
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.samplers import make_scheduler
from ldm.train.config import LDMRunConfig
from ldm.train.diffusion import train_ldm
from ldm.training.loader import TrainBatches

PROMPT = "a red circle on a black background"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


def test_buckets_give_batches_of_one_shape_each(mixed_folder):
    cfg = finetune_config("unused", "unused", mixed_folder).data
    data = build_dataset(cfg, "train", seed=0, bucket_step=16)  # f=2: sides multiples of 16
    assert len(data) == 2 * 11  # 12 images, 1 held out for validation, repeated twice
    assert len(set(data.bucket_of)) == 3
    batches = TrainBatches(data, 2, seed=0)
    shapes = {tuple(next(batches)["pixel_values"].shape[2:]) for _ in range(12)}  # one shape per batch
    assert shapes == {(64, 32), (48, 48), (32, 64)}  # (H, W) of the three buckets
    resumed = TrainBatches(data, 2, seed=0, state=batches.state_dict())
    torch.testing.assert_close(next(resumed)["pixel_values"], next(batches)["pixel_values"])


def test_full_finetune_from_a_diffusers_folder(tmp_path, sd_folder, mixed_folder, caplog):
    caplog.set_level(logging.INFO, logger="ldm")
    out = train_ldm(finetune_config(tmp_path / "full", sd_folder, mixed_folder, "text.train=true"))
    assert "aspect-ratio buckets" in caplog.text and "scaled_linear" in caplog.text
    assert (out / "model" / "model_index.json").exists()
    tuned = StableDiffusionPipeline.from_pretrained(out / "model")
    base = StableDiffusionPipeline.from_pretrained(sd_folder)
    assert tuned.scheduler.config.beta_schedule == "scaled_linear"  # the pretrained schedule, kept
    changed = [
        not torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), base.unet.parameters(), strict=True)
    ]
    assert all(changed[:3])
    for a, b in zip(tuned.vae.parameters(), base.vae.parameters(), strict=True):  # frozen
        assert torch.equal(a, b)
    text_changed = [not torch.equal(a, b) for a, b in zip(tuned.text_encoder.parameters(), base.text_encoder.parameters(), strict=True)]  # fmt: skip
    assert any(text_changed)  # text.train=true


def test_lora_file_loads_into_diffusers_and_ours(tmp_path, sd_folder, mixed_folder):
    cfg = finetune_config(tmp_path / "lora", sd_folder, mixed_folder, "lora.rank=4", "lora.alpha=8",
                          "lora.text_encoder=true", "lora.merge=true", "lora.format=both",
                          "lora.target_modules=[to_q,to_k,to_v,to_out.0,conv1,conv2]")  # fmt: skip
    # (attention and the resnets' convolutions: a file of both loses neither in diffusers' loader)
    out = train_ldm(cfg)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()

    def diffusers_image(pipe):
        latents = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)  # the same sampler as ours
        return pipe(
            PROMPT, num_inference_steps=3, guidance_scale=3.0, latents=latents, output_type="pt"
        ).images

    theirs = StableDiffusionPipeline.from_pretrained(sd_folder)
    before = diffusers_image(theirs)
    theirs.load_lora_weights(out / "lora")
    after = diffusers_image(theirs)
    assert (after - before).abs().max() > 1e-3  # the adapters change the output

    ours = LatentDiffusionPipeline.from_pretrained(sd_folder, channels_last=False)
    ours.load_lora_weights(out / "lora")
    latents = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    mine = ours(
        PROMPT, num_inference_steps=3, guidance_scale=3.0, sampler="ddim", latents=latents, output_type="pt"
    )
    torch.testing.assert_close(mine.images, after, rtol=0, atol=1e-4)  # both in [0, 1]

    merged = StableDiffusionPipeline.from_pretrained(out / "model")  # lora.merge=true: adapters fused
    torch.testing.assert_close(diffusers_image(merged), after, rtol=0, atol=1e-4)

    # lora.format=both: the kohya layout (alpha 8 over rank 4 kept) gives diffusers the same images
    from safetensors import safe_open

    with safe_open(out / "lora" / "kohya_lora.safetensors", "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert {k.split("_")[1] for k in keys} == {"unet", "te1"} and alphas == {8.0}
    kohya = StableDiffusionPipeline.from_pretrained(sd_folder)
    kohya.load_lora_weights(out / "lora", weight_name="kohya_lora.safetensors")
    torch.testing.assert_close(diffusers_image(kohya), after, rtol=0, atol=1e-4)
    ours = LatentDiffusionPipeline.from_pretrained(sd_folder, channels_last=False)
    ours.load_lora_weights(out / "lora" / "kohya_lora.safetensors")  # ours reads it through diffusers' loader
    latents = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    mine = ours(
        PROMPT, num_inference_steps=3, guidance_scale=3.0, sampler="ddim", latents=latents, output_type="pt"
    )
    torch.testing.assert_close(mine.images, after, rtol=0, atol=1e-4)


def test_dora_file_loads_into_diffusers_and_gives_our_images(tmp_path, sd_folder, mixed_folder):
    """lora.kind=dora: the adapters and magnitude vectors in diffusers' file; diffusers' loader reads
    them as DoRA and draws what our pipeline draws with the same file."""
    from safetensors import safe_open

    cfg = finetune_config(
        tmp_path / "dora", sd_folder, mixed_folder, "lora.rank=4", "lora.kind=dora", "lora.merge=true"
    )
    out = train_ldm(cfg)
    with safe_open(out / "lora" / "pytorch_lora_weights.safetensors", "pt") as f:
        assert any("lora_magnitude_vector" in k for k in f.keys())
    latents = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    theirs = StableDiffusionPipeline.from_pretrained(sd_folder)
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = make_scheduler("ddim", theirs.scheduler.config)
    before = theirs(
        PROMPT, num_inference_steps=3, guidance_scale=3.0, latents=latents, output_type="pt"
    ).images
    theirs.load_lora_weights(out / "lora")
    after = theirs(
        PROMPT, num_inference_steps=3, guidance_scale=3.0, latents=latents, output_type="pt"
    ).images
    assert (after - before).abs().max() > 1e-3
    ours = LatentDiffusionPipeline.from_pretrained(sd_folder, channels_last=False)
    ours.load_lora_weights(out / "lora")
    mine = ours(
        PROMPT, num_inference_steps=3, guidance_scale=3.0, sampler="ddim", latents=latents, output_type="pt"
    )
    torch.testing.assert_close(mine.images, after, rtol=0, atol=1e-4)
    merged = StableDiffusionPipeline.from_pretrained(out / "model")  # the trained DoRA fused by peft
    merged.set_progress_bar_config(disable=True)
    merged.scheduler = make_scheduler("ddim", merged.scheduler.config)
    fused = merged(
        PROMPT, num_inference_steps=3, guidance_scale=3.0, latents=latents, output_type="pt"
    ).images
    torch.testing.assert_close(fused, after, rtol=0, atol=1e-4)  # the file's magnitudes were applied
    with pytest.raises(ConfigError, match="magnitude"):
        finetune_config(
            tmp_path / "x", sd_folder, mixed_folder, "lora.rank=4", "lora.kind=dora", "lora.format=kohya"
        )


def test_csv_source_with_a_missing_file_and_hf_buckets(tmp_path, mixed_folder, caplog):
    import datasets

    rows = (
        ["file,caption"] + [f"{mixed_folder}/{i:02d}.png,caption {i}" for i in range(12)] + ["gone.png,lost"]
    )
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = finetune_config("unused", "unused", tmp_path / "data.csv", "data.dataset=csv", "data.image_column=file",
                          "data.caption_column=caption", "data.repeats=1").data  # fmt: skip
    with caplog.at_level(logging.WARNING):
        data = build_dataset(cfg, "train", seed=0, bucket_step=16)
    assert "skipped 1 of 13 rows" in caplog.text
    assert len(data) == 11 and data[0]["caption"].startswith("caption ")
    bad = finetune_config("unused", "unused", tmp_path / "data.csv", "data.dataset=csv").data
    with pytest.raises(ValueError, match="columns: file, caption"):
        build_dataset(bad, "train", seed=0)

    images = [Image.open(mixed_folder / f"{i:02d}.png").convert("RGB") for i in range(12)]
    datasets.Dataset.from_dict({"image": images, "text": ["x"] * 12}).save_to_disk(tmp_path / "hf")
    hf = finetune_config("unused", "unused", tmp_path / "hf", "data.dataset=hf").data
    data = build_dataset(hf, "train", seed=0, bucket_step=16)
    assert len(set(data.bucket_of)) == 3 and len(data) == 22


def test_noise_schedule_comes_from_the_pretrained_folder(tmp_path):
    from ldm.diffusion.config import NoiseConfig
    from ldm.train.models import pretrained_noise

    DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction").save_pretrained(
        tmp_path / "sd2" / "scheduler"
    )
    noise = pretrained_noise(tmp_path / "sd2", NoiseConfig())  # ours defaults to squaredcos epsilon
    assert (noise.beta_schedule, noise.prediction_type) == ("scaled_linear", "v_prediction")
    with pytest.raises(FileNotFoundError, match="scheduler"):
        pretrained_noise(tmp_path / "nothing", NoiseConfig())
    with pytest.raises(ValueError, match="lora.text_encoder"):
        load_config(LDMRunConfig, None, ["lora.rank=4", "text.train=true"])


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_save_load_in_ours_and_equal_the_merged_model(kind, tmp_path, sd_folder, mixed_folder):
    """lora.kind=loha|lokr (peft's LoHa and LoKr): peft's layout, which diffusers' LoRA loader does not
    read; our pipeline loads it and draws what the merged export draws."""
    cfg = finetune_config(tmp_path / kind, sd_folder, mixed_folder, "lora.rank=4", f"lora.kind={kind}",
                          "lora.text_encoder=true", "lora.merge=true")  # fmt: skip
    out = train_ldm(cfg)
    assert (out / "lora" / "unet" / "adapter_model.safetensors").exists()
    assert (out / "lora" / "text_encoder" / "adapter_config.json").exists()
    latents = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))

    def ours_image(pipe):
        return pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, sampler="ddim", latents=latents.clone(),
                    output_type="pt").images  # fmt: skip

    base = ours_image(LatentDiffusionPipeline.from_pretrained(sd_folder, channels_last=False))
    ours = LatentDiffusionPipeline.from_pretrained(sd_folder, channels_last=False)
    ours.load_lora_weights(out / "lora")
    adapted = ours_image(ours)
    assert (adapted - base).abs().max() > 1e-3  # the trained adapters change the output
    merged = StableDiffusionPipeline.from_pretrained(out / "model")  # fused by peft's merge, in diffusers
    merged.set_progress_bar_config(disable=True)
    merged.scheduler = make_scheduler("ddim", merged.scheduler.config)
    theirs = merged(
        PROMPT, num_inference_steps=3, guidance_scale=3.0, latents=latents.clone(), output_type="pt"
    )
    torch.testing.assert_close(adapted, theirs.images, rtol=0, atol=1e-4)
    ours.fuse_lora()  # ours fuses them too
    torch.testing.assert_close(ours_image(ours), adapted, rtol=0, atol=1e-4)


def test_rank_and_alpha_per_module_kind_reach_diffusers(tmp_path, sd_folder, mixed_folder):
    """lora.rank_pattern / alpha_pattern (peft's): the file holds each module's rank, its metadata each
    alpha, so diffusers' loader draws what the merged export draws."""
    from safetensors import safe_open

    cfg = finetune_config(tmp_path / "pattern", sd_folder, mixed_folder, "lora.rank=4", "lora.merge=true",
                          "lora.rank_pattern={to_k: 2}", "lora.alpha_pattern={to_v: 16}")  # fmt: skip
    out = train_ldm(cfg)
    with safe_open(out / "lora" / "pytorch_lora_weights.safetensors", "pt") as f:
        ranks = {
            k.split(".lora")[0].rsplit(".", 1)[-1]: f.get_tensor(k).shape[0]
            for k in f.keys()
            if "lora_A" in k
        }
    assert ranks == {"to_q": 4, "to_k": 2, "to_v": 4, "0": 4}  # to_out.0 ends in "0"
    latents = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
        return pipe(
            PROMPT, num_inference_steps=3, guidance_scale=3.0, latents=latents.clone(), output_type="pt"
        ).images

    theirs = StableDiffusionPipeline.from_pretrained(sd_folder)
    theirs.load_lora_weights(out / "lora")
    merged = StableDiffusionPipeline.from_pretrained(out / "model")
    torch.testing.assert_close(image(theirs), image(merged), rtol=0, atol=1e-4)
    assert theirs.unet.peft_config[next(iter(theirs.unet.peft_config))].alpha_pattern == {"to_v": 16}


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_every_kind_gets_the_per_module_patterns(kind):
    from ldm.models.config import LoRAConfig
    from ldm.models.lora import _peft_config

    cfg = LoRAConfig(rank=4, kind=kind, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 16.0})
    peft = _peft_config(cfg, ["to_q", "to_k", "to_v"])
    assert peft.rank_pattern == {"to_k": 2} and peft.alpha_pattern == {"to_v": 16.0}
