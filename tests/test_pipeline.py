"""LatentDiffusionPipeline on tiny CPU models: parity with diffusers, seeds, samplers, argument errors."""

import numpy as np
import pytest
import torch
from conftest import tiny_autoencoder
from diffusers import StableDiffusionPipeline

from conditioning import TextEncoderConfig, build_text_encoder
from ldm.diffusion.config import NoiseConfig, UNetConfig
from ldm.diffusion.noise import training_scheduler
from ldm.diffusion.unet import build_unet
from ldm.pipeline import LatentDiffusionPipeline
from ldm.samplers import SAMPLERS, make_scheduler

PROMPTS = ["a red circle on a black background", "a blue square on a white background"]


@pytest.fixture(scope="module")
def pipe() -> LatentDiffusionPipeline:
    torch.manual_seed(0)
    vae = tiny_autoencoder(scaling_factor=0.7)
    text = build_text_encoder(
        TextEncoderConfig(hidden_size=32, num_heads=2, intermediate_size=64, max_length=16)
    )
    unet = build_unet(UNetConfig(block_out_channels=[32, 32], norm_num_groups=8), 4, 8, 32)
    return LatentDiffusionPipeline(
        vae, text.model, text.tokenizer, unet, training_scheduler(NoiseConfig()).config
    ).to()


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "euler", "pndm", "unipc"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_equals_diffusers_stable_diffusion_pipeline(pipe, sampler, guidance):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=guidance,
        sampler=sampler,
        latents=latents,
        output_type="np",
    )
    sd = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=make_scheduler(sampler, pipe.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    theirs = sd(
        PROMPTS, num_inference_steps=4, guidance_scale=guidance, latents=latents, output_type="pt"
    ).images
    ours_pt = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=guidance,
        sampler=sampler,
        latents=latents,
        output_type="pt",
    ).images
    torch.testing.assert_close((ours_pt + 1) / 2, theirs, rtol=0, atol=1e-4)
    assert ours.images.dtype == np.uint8 and ours.images.shape == (2, 16, 16, 3)


def test_seeds_reproduce_and_differ(pipe):
    a = pipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=2.0, seed=5, output_type="pt").images
    b = pipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=2.0, seed=5, output_type="pt").images
    c = pipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=2.0, seed=6, output_type="pt").images
    assert torch.equal(a, b) and not torch.allclose(a, c)
    two = pipe(
        PROMPTS[:1],
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=2.0,
        seed=[5, 6],
        output_type="pt",
    )
    torch.testing.assert_close(two.images[0], a[0]) and torch.testing.assert_close(two.images[1], c[0])


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs(pipe, sampler):
    out = pipe(PROMPTS, num_inference_steps=3, guidance_scale=2.0, sampler=sampler, seed=0, output_type="pil")
    assert len(out.images) == 2 and out.images[0].size == (16, 16)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"height": 15}, "height"),
        ({"sampler": "nope"}, "unknown sampler .* ddim"),
        ({"negative_prompt": ["a", "b", "c"]}, "negative_prompt"),
        ({"prompt": []}, "prompt"),
        ({"output_type": "jpg"}, "output_type"),
    ],
)
def test_bad_arguments_name_the_argument(pipe, kwargs, word):
    args = {"prompt": PROMPTS, "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=word):
        pipe(**args)


def test_public_api_import_and_from_pretrained_errors(tmp_path):
    from ldm import SAMPLERS as registry
    from ldm import LatentDiffusionPipeline as Public

    assert Public is LatentDiffusionPipeline and "dpm++2m" in registry
    with pytest.raises(FileNotFoundError, match="missing .*unet/"):
        Public.from_pretrained(tmp_path)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "euler-a"])
def test_v_prediction_equals_diffusers(pipe, sampler):
    v_pipe = LatentDiffusionPipeline(
        pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet,
        training_scheduler(NoiseConfig(prediction_type="v_prediction")).config,
    )  # fmt: skip
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ours = v_pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, sampler=sampler, latents=latents,
                  generator=[torch.Generator().manual_seed(s) for s in (11, 12)], output_type="pt").images  # fmt: skip
    sd = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=make_scheduler(sampler, v_pipe.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    sd.set_progress_bar_config(disable=True)
    theirs = sd(PROMPTS, num_inference_steps=4, guidance_scale=3.0, latents=latents, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in (11, 12)]).images  # fmt: skip
    assert sd.scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close((ours + 1) / 2, theirs, rtol=0, atol=1e-4)


def test_karras_sigmas_run_the_whole_schedule(pipe):
    """Karras sigmas can round two high sigmas to one timestep: sampling must still start at step 0."""
    out = pipe(PROMPTS[:1], num_inference_steps=30, guidance_scale=2.0, sampler="dpm++2m-karras", seed=0)
    assert len(out.images) == 1
