"""Evaluation on known inputs: image metrics, the variational bound, CLIP score, and ldm-eval end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_autoencoder
from diffusers import DDPMScheduler
from PIL import Image
from test_ldm_train import tiny
from transformers import CLIPModel

from ldm.cli.eval import main as ldm_eval
from ldm.eval.bound import discretized_gaussian_nll, gaussian_kl, model_variance, posterior, variational_bound
from ldm.eval.clip_score import clip_score as score_images
from ldm.eval.clip_score import load_clip_scorer
from ldm.eval.pipeline_eval import sweep_prompts
from ldm.eval.quality import pairwise_diversity, psnr, ssim
from ldm.train.diffusion import train_ldm

T = 100


def schedule(**kwargs) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **kwargs
    )


# ------------------------------------------------------------------------------ image metrics
def test_psnr_of_identical_images_is_capped_and_ssim_is_1():
    x = torch.rand(3, 3, 24, 24) * 2 - 1
    assert torch.equal(psnr(x, x), torch.full((3,), 100.0))
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    assert (psnr(x, noisy) < 40).all() and (ssim(x, noisy) < 0.99).all()


def test_pairwise_diversity():
    a, b = torch.full((1, 3, 4, 4), -1.0), torch.full((1, 3, 4, 4), 1.0)  # black and white: RMS distance 1
    assert pairwise_diversity(torch.cat([a, a, a]), ["p", "p", "p"]) == 0.0
    assert pairwise_diversity(torch.cat([a, b, a, a]), ["p", "p", "q", "q"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two or more"):
        pairwise_diversity(torch.cat([a, b]), ["p", "q"])
    prompts, seeds = sweep_prompts(["x", "y", "x", "", "z"], num_samples=6, seeds_per_prompt=3)
    assert prompts == ["x", "x", "x", "y", "y", "y"] and seeds == [0, 1, 2, 0, 1, 2]


# ------------------------------------------------------------------------------ the bound
def test_gaussian_kl_matches_torch_distributions():
    m1, m2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    v1, v2 = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(5, dtype=torch.float64) + 0.1
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, v1.sqrt()), torch.distributions.Normal(m2, v2.sqrt())
    )
    torch.testing.assert_close(gaussian_kl(m1, v1, m2, v2), expected)


def test_the_discretized_decoder_of_a_perfect_prediction_is_the_bin_mass():
    """DDPM's L_0 (eq. 13) with mean = x: the mass of N(0, sigma^2) on the pixel's bin, [-h, h] inside,
    [-h, inf) at the edges (h = 1/255); its levels' probabilities sum to 1."""
    import math

    def cdf(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    sigma, h = 0.01, 1 / 255
    x = torch.tensor([-1.0, -1 + 2 * h, 0.0 + h, 1 - 2 * h, 1.0], dtype=torch.float64)  # edge, inside, edge
    nll = discretized_gaussian_nll(x, x, torch.full_like(x, sigma**2))
    inside = cdf(h / sigma) - cdf(-h / sigma)
    edge = cdf(h / sigma)
    expected = -torch.log(torch.tensor([edge, inside, inside, inside, edge], dtype=torch.float64))
    torch.testing.assert_close(nll, expected, rtol=1e-9, atol=1e-12)
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)  # every level of one pixel, one mean
    mass = torch.exp(
        -discretized_gaussian_nll(levels, torch.full_like(levels, 0.3), torch.full_like(levels, 0.04))
    )
    assert abs(mass.sum().item() - 1.0) < 1e-9


def test_posterior_equals_diffusers_ddpm_step():
    """q(z_{t-1} | z_t, z_0): diffusers' DDPM step from the true z_0 draws mean + sqrt(beta~) noise."""
    sched = schedule(prediction_type="sample", variance_type="fixed_small", clip_sample=False)
    sched.alphas_cumprod = sched.alphas_cumprod.double()  # float64 throughout: compare the formulas
    z0, zt = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for t in (1, 37, 99):
        prev = sched.step(z0, t, zt, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(zt.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        mean, var = posterior(z0, zt, torch.full((2,), t), sched.alphas_cumprod)
        torch.testing.assert_close(prev, mean + var.sqrt() * noise, rtol=1e-10, atol=1e-10)
    var = model_variance("fixed_small", sched.alphas_cumprod)
    assert var[0] == var[1] > 0  # beta~_1 = 0 replaced by beta~_2


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_bound_of_an_oracle_denoiser_is_lower_than_that_of_a_zero_predictor(kind):
    ac = schedule().alphas_cumprod
    z0 = torch.randn(4, 2, 4, 4)

    def oracle(zt, i):  # knows z_0: predicts the exact eps, v or z_0
        a = ac[i].view(-1, 1, 1, 1)
        eps = (zt - a.sqrt() * z0) / (1 - a).sqrt()
        return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * z0, "sample": z0}[kind]

    def zero(zt, i):
        return torch.zeros_like(zt)

    exact = variational_bound(oracle, z0, ac, kind, num_strata=T - 1)
    assert exact["timesteps"].tolist() == list(range(1, T))  # every t once: the sum is exact
    assert exact["diffusion"].abs().max() < 1e-6  # each L_{t-1} is a KL between equal Gaussians
    worse = variational_bound(zero, z0, ac, kind, num_strata=20)
    assert (exact["bpd"] < worse["bpd"]).all() and (worse["diffusion"] > 0).all()
    assert (exact["prior"] > 0).all() and torch.equal(exact["prior"], worse["prior"])  # L_T: no model


# ------------------------------------------------------------------------------ CLIP score
def test_clip_score_from_a_local_clip_model(tiny_clip_folder):
    model, tokenizer = load_clip_scorer(tiny_clip_folder)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1  # the vision tower's size: no resizing
    captions = ["a red circle", "a blue square", "a green triangle", "a gray background"]
    scores = score_images(model, tokenizer, images, captions, batch_size=3)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    clip = CLIPModel.from_pretrained(tiny_clip_folder)
    logits = clip(
        input_ids=tokenizer(captions, padding="max_length", return_tensors="pt").input_ids,
        pixel_values=((images + 1) / 2 - mean) / std,
    ).logits_per_image  # logit_scale * cosine, (images, captions)
    cosine = logits.diagonal() / clip.logit_scale.exp()
    torch.testing.assert_close(scores, 100 * cosine.clamp_min(0), rtol=1e-4, atol=1e-4)
    assert ((scores >= 0) & (scores <= 100)).all()


# ------------------------------------------------------------------------------ ldm-eval
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    vae = root / "vae"
    tiny_autoencoder(scaling_factor=0.8).save_pretrained(vae)
    run = train_ldm(
        tiny(root / "run", vae, "train.max_steps=2", "train.sample_every=0", "eval.guidance_scales=[1]")
    )
    return run, vae


def test_ldm_eval_pipeline_with_fid_kid_and_clip_score(
    tiny_run, inception_file, tiny_clip_folder, tmp_path, monkeypatch
):
    import ldm.eval.clip_score as clip_module
    import ldm.eval.fid as fid_module
    from ldm.core.config import load_config
    from ldm.data import build_dataset
    from ldm.eval.pipeline_eval import reference_images
    from ldm.train.config import LDMRunConfig

    run, _ = tiny_run
    calls = {}  # name -> [(args, result)] of each call of the metric functions the evaluation imports

    def record(module, name):
        function = getattr(module, name)
        calls[name] = []

        def recorded(*args, **kwargs):
            result = function(*args, **kwargs)
            calls[name].append((args, result))
            return result

        monkeypatch.setattr(module, name, recorded)

    for name in ("inception_features", "frechet_distance", "kernel_inception_distance"):
        record(fid_module, name)
    record(clip_module, "clip_score")
    out = tmp_path / "eval"
    reference = tmp_path / "reference"  # FID/KID against a folder of images
    reference.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(reference / f"{i}.png")
    code = ldm_eval([str(run), "--out", str(out), f"eval.inception_weights={inception_file}",
                     f"eval.clip_model={tiny_clip_folder}", "eval.guidance_scales=[1,2]",
                     f"eval.fid_reference={reference}"])  # fmt: skip
    assert code == 0
    results = json.loads((out / "eval.json").read_text())
    assert [r["guidance"] for r in results["guidance_sweep"]] == [1, 2, 4]  # + sample.guidance_scale
    assert results["skipped"] == []
    # FID and KID: the reference folder against the samples at the working scale (sample.guidance_scale 4)
    [(real_args, real_features), (fake_args, fake_features)] = calls["inception_features"]
    real, fake = real_args[1], fake_args[1]
    torch.testing.assert_close(real, reference_images(str(reference), 16))  # the folder's 5 images
    assert fake.shape == (4, 3, 16, 16)
    [(fid_args, fid)], [(kid_args, kid)] = calls["frechet_distance"], calls["kernel_inception_distance"]
    for a, b in (fid_args[:2], kid_args[:2]):  # both distances compare these two feature sets
        assert a is real_features and b is fake_features
    assert results["fid"] == fid and results["fid"] > 0  # generated images differ from the folder's
    assert (results["kid"], results["kid_std"]) == kid and results["kid_std"] > 0
    # CLIP score and diversity: each scale's samples with their prompts (2 captions x 2 seeds)
    cfg = load_config(LDMRunConfig, run / "config.yaml", [])
    val = build_dataset(cfg.data, "val", cfg.seed)
    prompts, _ = sweep_prompts([val[i]["caption"] for i in range(len(val))], 4, 2)
    assert len(calls["clip_score"]) == 3 and all(args[3] == prompts for args, _ in calls["clip_score"])
    for row, (args, scores) in zip(results["guidance_sweep"], calls["clip_score"], strict=True):
        # (0 here: the random CLIP's cosines are negative and the score clamps them at 0)
        assert row["clip_score"] == pytest.approx(float(scores.mean()))
        assert row["diversity"] == pytest.approx(pairwise_diversity(args[2], prompts), rel=1e-6)
        assert row["diversity"] > 0.01  # the 2 seeds of a caption give different images
    assert torch.equal(calls["clip_score"][2][0][2], fake)  # FID/KID/CLIP measure the same samples
    assert results["fid_images"] == 4  # min(5 reference images, 4 samples)
    assert results["num_latents"] == 8 and len(results["loss_per_timestep"]) == 4
    report = (out / "report.md").read_text()
    assert "## FID and KID" in report and "Not measured" not in report and "](../" in report  # run's losses
    for png in ("guidance_sweep.png", "guidance_grid.png", "timestep_curves.png", "losses.png"):
        assert (out / png).exists(), png


def test_ldm_eval_autoencoder_and_bad_folders(tiny_run, tmp_path, capsys):
    _, vae = tiny_run
    out = tmp_path / "vae-eval"
    assert (
        ldm_eval([str(vae), "--out", str(out), "data.resolution=16", "data.val_size=8", "eval.num_samples=8"])
        == 0
    )
    results = json.loads((out / "eval.json").read_text())
    assert results["num_samples"] == 8 and results["scaling_factor"] == 0.8 and len(results["skipped"]) == 2
    report = (out / "report.md").read_text()
    assert (
        "## Reconstruction" in report and "LPIPS skipped" in report and (out / "reconstructions.png").exists()
    )
    with pytest.raises(SystemExit) as exit_info:
        ldm_eval([str(tmp_path / "nothing-here")])
    assert exit_info.value.code == 2 and "no folder at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ldm_eval([str(vae)])  # not a run folder: --out is needed
    assert "give --out" in capsys.readouterr().err
