"""LatentDiffusionPipeline on tiny CPU models: parity with diffusers, seeds, samplers, argument errors."""

import numpy as np
import pytest
import torch
from conftest import tiny_autoencoder
from diffusers import StableDiffusionPipeline

from conditioning import TextEncoderConfig, build_text_encoder
from ldm.diffusion.config import NoiseConfig
from ldm.diffusion.ddpm import training_scheduler
from ldm.models.config import UNetConfig
from ldm.models.unet import build_unet
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.samplers import make_scheduler, samplers_for

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
    theirs = {
        kind: sd(
            PROMPTS, num_inference_steps=4, guidance_scale=guidance, latents=latents, output_type=kind
        ).images
        for kind in ("np", "pt")
    }
    ours_pt = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=guidance,
        sampler=sampler,
        latents=latents,
        output_type="pt",
    ).images
    # diffusers' conventions as they are, no conversion: float32 in [0, 1], NHWC for "np", NCHW for "pt"
    assert ours.images.dtype == theirs["np"].dtype == np.float32 and ours.images.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(ours.images, theirs["np"], rtol=0, atol=1e-4)
    assert ours_pt.dtype == theirs["pt"].dtype and ours_pt.shape == theirs["pt"].shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours_pt, theirs["pt"], rtol=0, atol=1e-4)
    assert 0.0 <= float(ours_pt.min()) and float(ours_pt.max()) <= 1.0


def test_output_types_are_one_image_in_each_form(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = {kind: pipe(PROMPTS, num_inference_steps=2, guidance_scale=2.0, latents=latents, output_type=kind).images
           for kind in ("pil", "np", "pt", "pt_signed", "latent")}  # fmt: skip
    torch.testing.assert_close(out["pt_signed"], out["pt"] * 2 - 1, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["np"], out["pt"].permute(0, 2, 3, 1).numpy())
    pil = np.stack([np.asarray(im) for im in out["pil"]]).astype(np.float32) / 255  # uint8, rounded
    np.testing.assert_allclose(pil, out["np"], rtol=0, atol=0.5 / 255 + 1e-6)
    assert out["latent"].shape == (2, 4, 8, 8)


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
    torch.testing.assert_close(two.images[0], a[0])  # image i depends on its own seed only
    torch.testing.assert_close(two.images[1], c[0])


@pytest.mark.parametrize("sampler", samplers_for("ddpm"))  # the flow samplers: tests/test_objectives.py
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
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_karras_sigmas_run_the_whole_schedule(pipe, monkeypatch):
    """Karras sigmas can round two high sigmas to one timestep: sampling must still start at step 0."""
    import ldm.pipelines.latent_diffusion as pipeline_module

    schedulers, step_indices, unet_calls, seen = [], [], [], []

    def recording_scheduler(*args, **kwargs):
        scheduler = make_scheduler(*args, **kwargs)
        step = scheduler.step

        def recorded_step(*step_args, **step_kwargs):
            out = step(*step_args, **step_kwargs)
            step_indices.append(scheduler.step_index - 1)  # the index of the sigma this step ran at
            return out

        scheduler.step = recorded_step
        schedulers.append(scheduler)
        return scheduler

    forward = pipe.unet.forward

    def counted_forward(*args, **kwargs):
        unet_calls.append(args[1] if len(args) > 1 else kwargs["timestep"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "make_scheduler", recording_scheduler)
    monkeypatch.setattr(pipe.unet, "forward", counted_forward)
    out = pipe(PROMPTS[:1], num_inference_steps=30, guidance_scale=2.0, sampler="dpm++2m-karras", seed=0,
               callback=lambda i, t, z: seen.append((i, int(t))))  # fmt: skip
    assert len(out.images) == 1 and len(schedulers) == 1
    scheduler = schedulers[0]
    timesteps = scheduler.timesteps.tolist()
    assert timesteps[0] == timesteps[1]  # the case this test is for: two high sigmas share a timestep
    assert step_indices == list(range(30))  # from step 0 (the highest sigma), none skipped
    assert scheduler.sigmas[step_indices[0]] == scheduler.sigmas.max()
    assert seen == [(i, t) for i, t in enumerate(timesteps)] and seen[0][1] == max(timesteps)
    assert len(unet_calls) == 30 and int(unet_calls[0]) == max(timesteps)
