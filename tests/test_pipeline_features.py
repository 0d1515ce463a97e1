"""Pipeline features on tiny CPU models: img2img, inpainting, guidance rescale, slicing, tiling, save/load."""

import pytest
import torch
from conftest import NEEDS_COMPILER
from test_pipeline import PROMPTS
from test_pipeline import pipe as pipe  # noqa: F401  (the tiny pipeline fixture)

from ldm.eval.quality import psnr
from ldm.pipelines.guidance import rescale_guidance
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline


def _image(seed: int = 0, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g) * 2 - 1  # (1, 3, H, W) in [-1, 1]


def test_img2img_stays_closer_to_the_image_at_low_strength(pipe):  # noqa: F811
    image = _image()
    target = pipe.decode_latents(pipe.encode_images(image))
    errors = {}
    for strength in (0.2, 1.0):
        out = pipe(
            PROMPTS[:1],
            image=image,
            strength=strength,
            num_inference_steps=10,
            seed=0,
            output_type="pt_signed",
        )
        assert out.images.shape == (1, 3, 16, 16)
        errors[strength] = (out.images - target).square().mean().item()
    assert errors[0.2] < errors[1.0]


def test_inpainting_keeps_the_unmasked_region(pipe):  # noqa: F811
    image = _image(1)
    target = pipe.decode_latents(pipe.encode_images(image))
    keep_all = torch.zeros(1, 1, 16, 16)  # mask in [0, 1]: 0 = keep everywhere
    out = pipe(
        PROMPTS[:1], image=image, mask=keep_all, num_inference_steps=5, seed=0, output_type="pt_signed"
    )
    torch.testing.assert_close(out.images, target, rtol=0, atol=1e-5)
    half = keep_all.clone()
    half[..., :, 8:] = 1  # regenerate the right half
    with pytest.raises(ValueError, match="mask"):
        pipe(PROMPTS[:1], image=image, mask=half * 2 - 1, num_inference_steps=2)
    out = pipe(PROMPTS[:1], image=image, mask=half, num_inference_steps=5, seed=0, output_type="pt_signed")
    left, right = (out.images - target)[..., :6].abs().mean(), (out.images - target)[..., 10:].abs().mean()
    assert left < right

    # the named entry points are the same calls
    named = pipe.inpaint(PROMPTS[:1], image, half, num_inference_steps=5, seed=0, output_type="pt_signed")
    assert torch.equal(named.images, out.images)
    kw = {"num_inference_steps": 4, "seed": 0, "output_type": "pt_signed"}
    assert torch.equal(
        pipe.img2img(PROMPTS[:1], image, 0.5, **kw).images,
        pipe(PROMPTS[:1], image=image, strength=0.5, **kw).images,
    )


def test_guidance_rescale():
    guided, cond = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    full = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))


def test_callback_and_guidance_rescale_run(pipe):  # noqa: F811
    seen = []
    pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, guidance_rescale=0.7, seed=0, output_type="latent",
         callback=lambda i, t, z: seen.append(i))  # fmt: skip
    assert seen == [0, 1, 2, 3]


def test_slicing_gives_the_same_images(pipe):  # noqa: F811
    plain = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=0, output_type="pt").images
    pipe.enable_attention_slicing(1)
    pipe.enable_vae_slicing()
    try:
        sliced = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=0, output_type="pt").images
    finally:
        pipe.vae.disable_slicing()
        pipe.set_attention("sdpa")
    torch.testing.assert_close(sliced, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("offload, slicing", [(True, False), (False, True)])
def test_tiled_decoding_of_a_4x_latent_equals_untiled(pipe, offload, slicing):  # noqa: F811
    """16 tiles of the training size; GroupNorm statistics of the whole image: no seams or tone shifts."""
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # 4x the default 8x8
    full = pipe.decode_latents(latents)
    pipe.enable_vae_tiling(tile_size=16, offload=offload)
    if slicing:
        pipe.enable_vae_slicing()
    try:
        tiled = pipe.decode_latents(latents)
    finally:
        pipe.disable_vae_tiling()
        pipe.vae.disable_slicing()
    assert tiled.shape == full.shape == (2, 3, 64, 64)
    assert psnr(tiled, full).min().item() >= 35.0
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-4)


def test_tiles_without_context_are_not_exact(pipe):  # noqa: F811
    """The padding is what makes tiles exact: without it the convolutions see zeros at tile edges."""
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    full = pipe.decode_latents(latents)
    pipe.enable_vae_tiling(tile_size=16, pad=0)
    try:
        assert psnr(pipe.decode_latents(latents), full).item() < 35.0
    finally:
        pipe.disable_vae_tiling()
    with pytest.raises(ValueError, match="tile_size"):
        pipe.enable_vae_tiling(tile_size=15)


def test_group_stats_merge_equals_whole_image_stats():
    from ldm.pipelines.tiled_decode import GroupStats, group_norm_with_stats

    x = torch.randn(2, 8, 12, 10) * 3 + 1
    stats = GroupStats(groups=4)
    for part in (x[..., :5, :], x[..., 5:9, :], x[..., 9:, :]):
        stats.add(part)
    var, mean = torch.var_mean(x.reshape(2, 4, -1), dim=-1, correction=0)
    torch.testing.assert_close(stats.mean, mean)
    torch.testing.assert_close(stats.var, var)
    norm = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.testing.assert_close(group_norm_with_stats(x, stats.mean, stats.var, norm), norm(x))


def test_save_pretrained_round_trip(pipe, tmp_path):  # noqa: F811
    folder = pipe.save_pretrained(tmp_path / "model")
    a = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=0, output_type="pt").images
    same_layout = LatentDiffusionPipeline.from_pretrained(folder, channels_last=False)
    b = same_layout(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=0, output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    nhwc = LatentDiffusionPipeline.from_pretrained(folder)  # channels_last: other kernels, float rounding
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    c = nhwc(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=0, output_type="pt").images
    torch.testing.assert_close(a, c, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, word", [({"strength": 0.0}, "strength"), ({"mask": torch.zeros(1, 1, 16, 16)}, "mask")]
)
def test_img2img_argument_errors(pipe, kwargs, word):  # noqa: F811
    with pytest.raises(ValueError, match=word):
        pipe(
            PROMPTS[:1],
            num_inference_steps=2,
            **({"image": _image()} if word == "strength" else {}),
            **kwargs,
        )


def test_sample_cli_writes_images_and_a_grid(pipe, tmp_path):  # noqa: F811
    from ldm.cli.sample import main

    folder = pipe.save_pretrained(tmp_path / "model")
    args = ["--model", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "-n", "2", "--steps", "2"]
    assert (
        main(
            [
                *args,
                "--guidance",
                "3",
                "--sampler",
                "euler",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(written) == 5 and "grid.png" in written
    with pytest.raises(SystemExit):
        main([*args, "--size", "15", "--device", "cpu", "--out", str(tmp_path / "bad")])


@NEEDS_COMPILER
def test_compiled_unet_and_decoder_give_the_same_images(pipe, tmp_path):  # noqa: F811
    """``compile=True, compile_vae=True`` run the UNet and the decoder through torch.compile (inductor;
    about a minute to compile on the CPU)."""
    folder = pipe.save_pretrained(tmp_path / "model")
    compiled = LatentDiffusionPipeline.from_pretrained(folder, compile=True, compile_vae=True)
    assert (
        compiled.unet._compiled_call_impl is not None and compiled.vae.decoder._compiled_call_impl is not None
    )
    a = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=0, output_type="pt").images
    b = compiled(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=0, output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert (compiled.save_pretrained(tmp_path / "again") / "unet" / "config.json").exists()


def test_swapped_vae_and_caption_eval_cli(pipe, tmp_path, capsys, monkeypatch):  # noqa: F811
    import json
    from types import SimpleNamespace

    from conftest import tiny_autoencoder

    from ldm.cli import caption_eval as caption_eval_module
    from ldm.cli.caption_eval import main as caption_eval
    from ldm.data.shapes import BACKGROUNDS, COLORS, ShapeSpec, render
    from ldm.eval.shapes_reader import parse_caption

    folder = pipe.save_pretrained(tmp_path / "model")
    other = tiny_autoencoder(scaling_factor=0.7)
    torch.nn.init.normal_(other.decoder.conv_out.weight)  # a different decoder, same latents
    other.save_pretrained(tmp_path / "vae")
    swapped = LatentDiffusionPipeline.from_pretrained(folder, vae=tmp_path / "vae")
    assert torch.equal(swapped.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)
    assert not torch.equal(swapped.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)

    out = tmp_path / "eval.json"
    args = ["--model", str(folder), "--color", "orange=240,140,30", "--seeds", "1", "--val", "3",
            "--resolution", "16", "--steps", "2", "--out", str(out)]  # fmt: skip
    assert caption_eval(args) == 0
    results = json.loads(out.read_text())
    assert results["orange_captions"]["n"] == 9 and results["original_captions"]["n"] == 3

    # a model that draws exactly what each prompt says scores 1.0 on both prompt sets (the new color
    # included); one that draws the new color as red scores 0 on color for it and nothing else
    palette = {**COLORS, "orange": (240, 140, 30)}
    loaded, prompts = [], []

    def drawing_model(red_for_orange: bool):
        def draw(batch, output_type="pil", **kwargs):
            prompts.extend(batch)
            specs = []
            for p in batch:
                color, shape, background = parse_caption(p, palette, BACKGROUNDS)
                color = "red" if red_for_orange and color == "orange" else color
                specs.append(ShapeSpec(color, shape, background, size=0.6, cx=0.5, cy=0.5))
            images = render(specs, 16, colors=palette).float() / 255  # (n, 3, 16, 16) in [0, 1]
            assert output_type in ("pt", "pt_signed"), output_type
            return SimpleNamespace(images=images * 2 - 1 if output_type == "pt_signed" else images)

        draw.objective = SimpleNamespace(name="ddpm")  # the CLI picks its default sampler by it
        return lambda model, vae=None: loaded.append(vae) or draw

    for red_for_orange in (False, True):
        monkeypatch.setattr(caption_eval_module, "LatentDiffusionPipeline",
                            SimpleNamespace(from_pretrained=drawing_model(red_for_orange)))  # fmt: skip
        assert caption_eval([*args, "--vae", str(tmp_path / "vae")]) == 0
        scores = json.loads(out.read_text())
        orange, original = scores["orange_captions"], scores["original_captions"]
        assert original == {"accuracy": 1.0, "color": 1.0, "shape": 1.0, "background": 1.0, "n": 3}
        if red_for_orange:
            assert orange == {"accuracy": 0.0, "color": 0.0, "shape": 1.0, "background": 1.0, "n": 9}
        else:
            assert orange == {"accuracy": 1.0, "color": 1.0, "shape": 1.0, "background": 1.0, "n": 9}
    assert loaded == [str(tmp_path / "vae")] * 2  # --vae reaches the pipeline
    assert len(set(prompts[:9])) == 9 and all(p.startswith("an orange ") for p in prompts[:9])
