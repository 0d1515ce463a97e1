"""SDXL: our pipeline on a tiny SDXL folder equals diffusers' StableDiffusionXLPipeline; the conditioner's
pooled embedding, micro-conditioning and zeroed unconditional input."""

import numpy as np
import pytest
import torch
from conftest import save_tiny_sdxl_pipeline
from diffusers import StableDiffusionXLPipeline

from conditioning.conditioner import time_ids
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.samplers import make_scheduler

PROMPTS = ["a red circle on a black background", "a blue square on a white background"]
MICRO = {"original_size": (64, 48), "crops_coords_top_left": (8, 4), "target_size": (32, 32)}
CASES = {
    "unguided": {"guidance_scale": 1.0},
    "guided": {"guidance_scale": 3.0},
    "negative": {"guidance_scale": 3.0, "negative_prompt": "blurry"},
    "micro": {"guidance_scale": 3.0, **MICRO},
    "negative-micro": {
        "guidance_scale": 3.0,
        "negative_original_size": (16, 16),
        "negative_target_size": (32, 32),
        **MICRO,
    },  # fmt: skip
}


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def pipes(sdxl_folder):
    ours = LatentDiffusionPipeline.from_pretrained(sdxl_folder)
    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def latents() -> torch.Tensor:
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpm++2m", "unipc"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_diffusers_sdxl_pipeline(pipes, sampler, case):
    ours, theirs = pipes
    assert ours.is_sdxl and ours.conditioner.zero_uncond  # force_zeros_for_empty_prompt, from the folder
    theirs.scheduler = make_scheduler(sampler, ours.scheduler_config)
    kw = CASES[case]
    # diffusers 0.42 interleaves negative_* time ids wrongly for 2+ prompts ([neg, pos].repeat(n) after
    # the concatenation, not before): compared on one prompt, where its rows are right
    n = 1 if case == "negative-micro" else 2
    prompts, z = PROMPTS[:n], latents()[:n]
    mine = ours(prompts, num_inference_steps=4, sampler=sampler, latents=z, output_type="np", **kw)
    ref = theirs(prompts, num_inference_steps=4, latents=z, output_type="np", **kw).images
    assert mine.images.shape == ref.shape == (n, 32, 32, 3)
    np.testing.assert_allclose(mine.images, ref, rtol=0, atol=1e-4)


def test_micro_conditioning_and_negative_prompt_change_the_images(pipes):
    ours, _ = pipes

    def run(**kw):
        kw = {"num_inference_steps": 3, "output_type": "np", "progress": False, **kw}
        return ours(PROMPTS, latents=latents(), **kw).images

    base = run(guidance_scale=3.0)
    for kw in ({"crops_coords_top_left": (16, 0)}, {"original_size": (256, 256)}, {"negative_prompt": "x"}):
        assert np.abs(run(guidance_scale=3.0, **kw) - base).max() > 1e-3, kw


def test_conditioning_shapes_and_zeroed_uncond(pipes):
    ours, _ = pipes
    conditioner = ours.conditioner
    cond = conditioner.encode(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)  # both contexts side by side
    assert cond["text_embeds"].shape == (2, 16) and conditioner.pooled_size == 16
    # the contexts are hidden_states[-2] of each encoder (before the final layer norm), as diffusers reads them
    ids = ours.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    expected = ours.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(cond["encoder_hidden_states"][..., :32], expected)
    uncond = conditioner.unconditional(2)
    assert all(float(v.abs().max()) == 0 for v in uncond.values())
    ids6 = time_ids(torch.tensor([[64, 48]]), torch.tensor([8, 4]), torch.tensor([32, 32]))
    assert ids6.tolist() == [[64.0, 48.0, 8.0, 4.0, 32.0, 32.0]]


def test_batch_conditions_drop_to_zeros_and_take_each_items_crop(pipes):
    ours, _ = pipes
    conditioner = ours.conditioner
    conditioner.p_uncond = 0.5
    batch = {
        "caption": PROMPTS,
        "original_size": torch.tensor([[40, 60], [32, 32]]),
        "crop_top_left": torch.tensor([[4, 0], [0, 0]]),
    }
    cond = conditioner.batch_conditions(conditioner.encode, batch, (32, 32), uniform=torch.tensor([0.9, 0.1]))
    assert cond["time_ids"].tolist() == [[40, 60, 4, 0, 32, 32], [32, 32, 0, 0, 32, 32]]
    assert (
        float(cond["encoder_hidden_states"][1].abs().max()) == 0 == float(cond["text_embeds"][1].abs().max())
    )
    torch.testing.assert_close(cond["text_embeds"][0], conditioner.encode(PROMPTS[:1])["text_embeds"][0])


def test_saved_sdxl_pipeline_loads_in_diffusers(pipes, tmp_path):
    ours, _ = pipes
    folder = ours.save_pretrained(tmp_path / "saved")
    again = StableDiffusionXLPipeline.from_pretrained(folder)
    assert type(again).__name__ == "StableDiffusionXLPipeline" and (folder / "text_encoder_2").is_dir()
    mine = ours(PROMPTS[:1], num_inference_steps=2, latents=latents()[:1], output_type="np", progress=False)
    back = LatentDiffusionPipeline.from_pretrained(folder)
    np.testing.assert_allclose(
        back(PROMPTS[:1], num_inference_steps=2, latents=latents()[:1], output_type="np", progress=False).images,
        mine.images, rtol=0, atol=1e-5,
    )  # fmt: skip


def test_negative_micro_conditioning_rows_follow_their_prompts(pipes):
    ours, _ = pipes
    kw = {**CASES["negative-micro"], "num_inference_steps": 3, "output_type": "np", "progress": False}
    both = ours(PROMPTS, latents=latents(), **kw).images
    for i in range(2):
        alone = ours(PROMPTS[i : i + 1], latents=latents()[i : i + 1], **kw).images
        np.testing.assert_allclose(both[i : i + 1], alone, rtol=0, atol=1e-5)


def test_every_trainable_parameter_of_a_scratch_sdxl_conditioner_gets_a_gradient():
    """DDP needs a gradient for each parameter that requires one: encoder 1's last layer and final norm
    (past hidden_states[-2], its pooled output unused) are frozen."""
    from conditioning import TextEncoderConfig, build_text_encoder
    from conditioning.conditioner import sdxl_conditioner

    small = dict(hidden_size=16, num_heads=2, intermediate_size=32, num_layers=2, max_length=8)
    first = build_text_encoder(TextEncoderConfig(**small))
    second = build_text_encoder(TextEncoderConfig(**small, with_projection=True))
    conditioner = sdxl_conditioner(first, second, freeze_unreached=True)
    cond = conditioner.encode(PROMPTS)
    (cond["encoder_hidden_states"].sum() + cond["text_embeds"].sum()).backward()
    trainable = [(n, p) for n, p in conditioner.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert trainable and not missing, missing
    norm = lambda e: getattr(e.model, "text_model", e.model).final_layer_norm.weight  # noqa: E731
    assert not norm(first).requires_grad and norm(second).requires_grad
