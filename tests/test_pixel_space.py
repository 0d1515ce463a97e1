"""Pixel-space diffusion (``autoencoder.kind=identity``): the identity autoencoder, the bound with
DDPM's discretized decoder, the rate-distortion curve, and a pixel model end to end."""

import json

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from test_ldm_train import tiny

from ldm.core.config import ConfigError, load_config
from ldm.eval.bound import rate_distortion, variational_bound
from ldm.models.autoencoder import IdentityAutoencoder
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.train.config import LDMRunConfig
from ldm.train.diffusion import train_ldm


def test_the_identity_autoencoder_round_trips_exactly():
    vae = IdentityAutoencoder(3, 16)
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    posterior = vae.encode(x).latent_dist
    for z in (posterior.mode(), posterior.mean, posterior.sample(torch.Generator().manual_seed(0))):
        assert torch.equal(z, x)
    assert torch.equal(posterior.std, torch.zeros_like(x))  # (the cache's std: no noise is added)
    assert torch.equal(vae.decode(x).sample, x)
    assert vae.config.scaling_factor == 1.0 and vae.config.latent_channels == 3
    assert len(vae.config.block_out_channels) == 1  # downsampling factor 1
    assert vae.to(torch.float64).dtype == torch.float64 and vae.device.type == "cpu"
    assert not list(vae.parameters())  # nothing to train, nothing to save


def test_the_pixel_bound_is_a_likelihood_and_its_rate_distortion_curve_falls_with_t():
    ac = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    levels = torch.randint(0, 256, (3, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    x0 = levels.float() / 127.5 - 1  # 8-bit images in [-1, 1]

    def oracle(xt, i):  # knows x_0: the exact eps
        a = ac[i].view(-1, 1, 1, 1)
        return (xt - a.sqrt() * x0) / (1 - a).sqrt()

    def zero(xt, i):
        return torch.zeros_like(xt)

    exact = variational_bound(oracle, x0, ac, "epsilon", num_strata=99, decoder="discretized")
    worse = variational_bound(zero, x0, ac, "epsilon", num_strata=20, decoder="discretized")
    # -log of a probability mass: never negative, unlike the latents' density
    assert (exact["decoder"] >= 0).all() and (exact["bpd"] > 0).all()
    assert (exact["bpd"] < worse["bpd"]).all()
    gaussian = variational_bound(oracle, x0, ac, "epsilon", num_strata=99)
    assert not torch.allclose(gaussian["decoder"], exact["decoder"])  # the decoder term is what differs
    assert torch.allclose(gaussian["diffusion"], exact["diffusion"])

    dims = x0[0].numel()
    rate, rmse = rate_distortion(
        worse["prior"], worse["per_timestep"], worse["weights"], worse["per_timestep_mse"], dims,
        worse["timesteps"], worse["strata_end"],
    )  # fmt: skip
    assert (rate[1:] <= rate[:-1]).all()  # sending fewer steps costs fewer bits
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    everything = (worse["prior"] + worse["diffusion"]).mean() / (dims * ln2)
    assert rate[0] <= everything + 1e-9 and rate[-1] >= worse["prior"].mean() / (dims * ln2)
    assert (rmse >= 0).all() and (rmse <= 255).all()  # clipped x^_0 on the [0, 255] scale
    _, exact_rmse = rate_distortion(
        exact["prior"], exact["per_timestep"], exact["weights"], exact["per_timestep_mse"], dims,
        exact["timesteps"], exact["strata_end"],
    )  # fmt: skip
    assert exact_rmse.max() < 0.05  # the oracle's x^_0 is the image at every t (to float32 rounding near T)


def pixel_config(out, *extra) -> LDMRunConfig:
    return tiny(out, None, "autoencoder.kind=identity", "vae=null", "preflight.samples=0", *extra)


def test_a_pixel_model_trains_exports_without_a_vae_and_loads_in_ours_and_diffusers(tmp_path):
    run = train_ldm(pixel_config(tmp_path / "pixel", "train.max_steps=3", "eval.guidance_scales=[1]"))
    model = run / "model"
    assert not (model / "vae").exists()
    assert json.loads((model / "model_index.json").read_text())["vae"] == [None, None]
    results = json.loads((run / "eval.json").read_text())
    assert results["bound_decoder"] == "discretized" and results["bpd"] > 0
    rd = results["rate_distortion"]
    assert len(rd["timesteps"]) == len(rd["rate_bpd"]) == len(rd["rmse"]) == 5
    assert (run / "rate_distortion.png").exists() and "rate-distortion" in (run / "report.md").read_text()

    ours = LatentDiffusionPipeline.from_pretrained(model, channels_last=False)
    assert ours.is_pixel_space and ours.vae_scale_factor == 1
    noise = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    kw = {"num_inference_steps": 3, "guidance_scale": 2.0}
    mine = ours("a red circle", latents=noise, sampler="ddim", output_type="pt_signed", progress=False, **kw)
    assert mine.images.shape == (1, 3, 16, 16)
    theirs = StableDiffusionPipeline.from_pretrained(
        model, vae=None, safety_checker=None, feature_extractor=None
    )
    out = theirs("a red circle", latents=noise, height=16, width=16, output_type="latent", **kw).images
    assert torch.allclose(mine.images, out.clamp(-1, 1), atol=1e-5)  # the same sampler on the same pixels
    with pytest.raises(ValueError, match="no VAE"):
        ours.save_single_file(tmp_path / "model.safetensors")

    # fine-tuning a pixel model: pretrained= finds no vae/ and keeps to pixels
    tuned = train_ldm(tiny(tmp_path / "tuned", None, "vae=null", f"pretrained={model}", "train.max_steps=1",
                           "eval.num_samples=0", "preflight.samples=0"))  # fmt: skip
    assert json.loads((tuned / "model" / "model_index.json").read_text())["vae"] == [None, None]


def test_pixel_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="vae=.* is set"):
        load_config(LDMRunConfig, None, ["autoencoder.kind=identity", "vae=some/vae"])
    with pytest.raises(ConfigError, match="single_file"):
        load_config(LDMRunConfig, None, ["autoencoder.kind=identity", "export.single_file=true"])
    with pytest.raises(ConfigError, match="autoencoder.kind"):
        load_config(LDMRunConfig, None, ["autoencoder.kind=vq"])


def test_the_discretized_decoder_stays_accurate_far_in_the_tails():
    from ldm.eval.bound import discretized_gaussian_nll

    sigma, h = 0.0047, 1 / 255  # sigma_1 of the cosine schedule: 0.1 off is 21 sigmas
    level = -1 + 2 * 128 / 255  # a pixel value on the grid
    x, mean = (
        torch.full((2,), level, dtype=torch.float64),
        torch.tensor([level + 0.1, level - 0.1], dtype=torch.float64),
    )
    nll = discretized_gaussian_nll(x, mean, torch.full_like(x, sigma**2))
    # the bin's mass is Phi(upper edge) - Phi(lower edge), all but Phi of the edge nearer the mean
    nearer = torch.tensor([(h - 0.1) / sigma, (h - 0.1) / sigma], dtype=torch.float64)
    assert torch.allclose(nll, -torch.special.log_ndtr(nearer), rtol=1e-6)
    assert (nll < 300).all()  # (the difference of the two CDFs underflowed to 0: 690.8 nats, clamped)
