"""Objectives (DDPM, rectified flow), their prediction algebra, the flow sampler and the Conditioner."""

import pytest
import torch
from conftest import tiny_autoencoder
from diffusers import FlowMatchEulerDiscreteScheduler

from conditioning import Conditioner, TextEncoderConfig, build_text_encoder
from ldm.core.config import ConfigError, load_config
from ldm.core.randomness import StepRandom
from ldm.diffusion.config import NoiseConfig
from ldm.diffusion.ddpm import DDPM
from ldm.diffusion.flow import RectifiedFlow, shift_time
from ldm.diffusion.registry import OBJECTIVES, build_objective, objective_for
from ldm.models.config import UNetConfig
from ldm.models.unet import build_unet
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.samplers import samplers_for
from ldm.train.config import LDMRunConfig

OBJECTIVE_CONFIGS = {
    "ddpm-epsilon": NoiseConfig(),
    "ddpm-v": NoiseConfig(prediction_type="v_prediction", min_snr_gamma=5.0),
    "ddpm-sample": NoiseConfig(prediction_type="sample", offset_noise=0.05),
    "ddpm-v-zero-snr": NoiseConfig(prediction_type="v_prediction", zero_terminal_snr=True),
    "flow-uniform": NoiseConfig(objective="rectified_flow"),
    "flow-logit-normal": NoiseConfig(objective="rectified_flow", timestep_sampling="logit_normal", shift=3.0),
}
CAPTIONS = ["a red circle on a black background", "a blue square on a white background", ""] * 2


def tiny_unet(context: int = 32):
    torch.manual_seed(0)
    return build_unet(UNetConfig(block_out_channels=[32, 32], norm_num_groups=8), 4, 8, context)


def tiny_conditioner(train: bool = False) -> Conditioner:
    torch.manual_seed(0)
    cfg = TextEncoderConfig(hidden_size=32, num_heads=2, intermediate_size=64, max_length=16, train=train)
    return Conditioner([build_text_encoder(cfg)], p_uncond=0.1)


@pytest.mark.parametrize("name", OBJECTIVE_CONFIGS)
def test_a_step_on_a_fixed_batch_lowers_the_loss(name):
    objective = build_objective(OBJECTIVE_CONFIGS[name])
    unet, cond = tiny_unet(), tiny_conditioner()
    z0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = Conditioner.unet_kwargs(cond.encode(CAPTIONS))

    def loss() -> torch.Tensor:  # the same t and eps every time
        return objective.loss(lambda z_t, t: unet(z_t, t, **kwargs).sample, z0, StepRandom(5))

    before = loss().item()
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    for _ in range(10):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.9 * before


@pytest.mark.parametrize("name", OBJECTIVE_CONFIGS)
def test_prediction_algebra_round_trips(name):
    """x0 -> (the target it implies) -> x0 and eps, for every prediction type and objective."""
    objective = build_objective(OBJECTIVE_CONFIGS[name])
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 4, 8, 8, generator=g).double(), torch.randn(8, 4, 8, 8, generator=g).double()
    t = objective.sample_timesteps(8, StepRandom(2), torch.device("cpu"))
    if isinstance(objective, DDPM):
        t = t.clamp(max=objective.num_train_timesteps - 2)  # abar_T = 0 with zero terminal SNR: x0 undefined
    z_t = objective.noised(x0, eps, t)
    pred = objective.target(x0, eps, t)
    torch.testing.assert_close(objective.to_x0(pred, z_t, t), x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(objective.to_eps(pred, z_t, t), eps, rtol=1e-6, atol=1e-6)
    # and eps -> x0 through the eps-parameterisation: z_t = noised(to_x0, to_eps)
    torch.testing.assert_close(
        objective.noised(objective.to_x0(pred, z_t, t), objective.to_eps(pred, z_t, t), t), z_t
    )


def test_flow_math_and_registry():
    flow = RectifiedFlow(shift=1.0)
    t = torch.tensor([0.0, 0.25, 1.0])
    x0, eps = torch.ones(3, 1, 1, 1), torch.full((3, 1, 1, 1), 3.0)
    assert flow.noised(x0, eps, t).flatten().tolist() == [1.0, 1.5, 3.0]  # (1 - t) x0 + t eps
    assert torch.equal(flow.target(x0, eps, t), eps - x0)
    assert torch.equal(flow.model_timestep(t), t * 1000)
    assert torch.allclose(shift_time(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    assert set(OBJECTIVES) == {"ddpm", "rectified_flow"}
    assert isinstance(objective_for(flow.scheduler_config()), RectifiedFlow)
    assert isinstance(objective_for(build_objective(NoiseConfig()).scheduler_config()), DDPM)
    assert samplers_for("rectified_flow") == ["flow-euler", "flow-heun", "flow-dpm++2m", "flow-unipc"]


def test_the_config_checks_the_objective_and_its_sampler():
    with pytest.raises(ConfigError, match="noise.objective"):
        load_config(LDMRunConfig, None, ["noise.objective=edm"])
    with pytest.raises(ConfigError, match="sample.sampler 'dpm\\+\\+2m' samples ddpm models.*flow-euler"):
        load_config(LDMRunConfig, None, ["noise.objective=rectified_flow"])
    with pytest.raises(ConfigError, match="apply to noise.objective=ddpm"):
        load_config(
            LDMRunConfig, None, ["noise.objective=rectified_flow", "noise.prediction_type=v_prediction"]
        )
    with pytest.raises(ConfigError, match="rectified_flow"):
        load_config(LDMRunConfig, None, ["noise.timestep_sampling=logit_normal"])
    cfg = load_config(LDMRunConfig, "configs/ldm/shapes-flow.yaml")
    assert cfg.noise.objective == "rectified_flow" and cfg.sample.sampler == "flow-euler"


@pytest.fixture(scope="module")
def flow_pipe() -> LatentDiffusionPipeline:
    cond = tiny_conditioner()
    text = cond.encoders[0]
    flow = RectifiedFlow(shift=2.0)
    return LatentDiffusionPipeline(
        tiny_autoencoder(0.7), text.model, text.tokenizer, tiny_unet(), flow.scheduler_config()
    ).to()


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_flow_sampler_is_euler_along_the_learned_velocity(flow_pipe, guidance):
    """flow-euler equals z_{i+1} = z_i + (s_{i+1} - s_i) v(z_i, 1000 s_i), written out by hand, with
    guidance on v, on diffusers' grid s_i = shift(linspace(1, shift(1/T), N)), s_N = 0 (its smallest
    sigma is the shifted 1/T, shifted once more with the rest)."""
    steps, shift = 6, 2.0
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = flow_pipe(CAPTIONS[:2], num_inference_steps=steps, guidance_scale=guidance, latents=z.clone(),
                     output_type="latent", progress=False).images  # fmt: skip
    low = float(shift_time(torch.tensor(1 / 1000, dtype=torch.float64), shift))
    sigmas = shift_time(torch.linspace(1.0, low, steps, dtype=torch.float64), shift).float().tolist() + [0.0]
    with torch.no_grad():
        cond = flow_pipe.encode_prompt(["", ""] + CAPTIONS[:2])["encoder_hidden_states"]
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            t = torch.tensor(s * 1000)
            if guidance > 1:
                v_u, v_c = flow_pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=cond).sample.chunk(2)
                v = v_u + guidance * (v_c - v_u)
            else:
                v = flow_pipe.unet(z, t, encoder_hidden_states=cond[2:]).sample
            z = z + (s_next - s) * v
    torch.testing.assert_close(ours, z, rtol=0, atol=1e-5)


def test_flow_models_refuse_ddpm_samplers(flow_pipe):
    with pytest.raises(ValueError, match="sampler 'ddim' samples ddpm models.*flow-euler, flow-heun"):
        flow_pipe(CAPTIONS[:1], num_inference_steps=2, sampler="ddim")
    out = flow_pipe(
        CAPTIONS[:1], num_inference_steps=3, sampler="flow-heun", output_type="np", progress=False
    )
    assert out.images.shape == (1, 16, 16, 3) and 0 <= out.images.min() and out.images.max() <= 1


@pytest.mark.parametrize("sampler", samplers_for("rectified_flow"))
def test_every_flow_sampler_integrates_the_same_flow(flow_pipe, sampler):
    """Each flow sampler ends near what 200 Euler steps give (first-order differences at 12 steps),
    so each reads the velocity as eps - z_0 and the time as 1000 t."""
    kw = {"guidance_scale": 1.0, "output_type": "latent", "progress": False}
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    fine = flow_pipe(CAPTIONS[:2], num_inference_steps=200, sampler="flow-euler", latents=z, **kw).images
    coarse = flow_pipe(CAPTIONS[:2], num_inference_steps=12, sampler=sampler, latents=z, **kw).images
    assert torch.isfinite(coarse).all()
    assert (coarse - fine).abs().mean() < 0.1 * fine.abs().mean()


def test_diffusers_loads_the_flow_export_but_its_sd_pipeline_cannot_sample_it(flow_pipe, tmp_path):
    """What diffusers lacks: StableDiffusionPipeline loads the folder (FlowMatchEulerDiscreteScheduler in
    scheduler/), but its __call__ needs ``scheduler.init_noise_sigma`` and ``scale_model_input``, which
    the flow-matching schedulers do not have."""
    from diffusers import StableDiffusionPipeline

    flow_pipe.save_pretrained(tmp_path / "flow")
    sd = StableDiffusionPipeline.from_pretrained(tmp_path / "flow", safety_checker=None)
    assert isinstance(sd.scheduler, FlowMatchEulerDiscreteScheduler)
    with pytest.raises(AttributeError, match="init_noise_sigma|scale_model_input"):
        sd(CAPTIONS[:1], num_inference_steps=2, height=16, width=16, output_type="latent")
    ours = LatentDiffusionPipeline.from_pretrained(tmp_path / "flow")
    assert isinstance(ours.objective, RectifiedFlow) and ours.objective.shift == 2.0
    kw = {
        "num_inference_steps": 3,
        "guidance_scale": 2.0,
        "seed": 0,
        "output_type": "latent",
        "progress": False,
    }
    torch.testing.assert_close(ours(CAPTIONS[:2], **kw).images, flow_pipe(CAPTIONS[:2], **kw).images)


@pytest.mark.parametrize("train", [False, True])
def test_conditioner_cache_gives_the_loss_of_encoding_on_the_fly(train):
    """Frozen: conditioning cached per caption; trained: token ids cached, each distinct caption
    encoded once per step. Both give the loss (and for the trained one the gradients) of encoding
    every caption on the fly."""
    cond, unet, objective = tiny_conditioner(train), tiny_unet(), build_objective(NoiseConfig())
    z0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    conditions = cond.training_conditions(cond)
    results = []
    for encode in (conditions, conditions, cond.encode):  # the second call reads the cache
        kwargs = Conditioner.unet_kwargs(encode(CAPTIONS))
        loss = objective.loss(lambda z_t, t, kw=kwargs: unet(z_t, t, **kw).sample, z0, StepRandom(3))
        grads = torch.autograd.grad(loss, list(cond.parameters())) if train else ()
        results.append((loss.detach(), grads))
    assert len(cond.cache) == len(set(CAPTIONS))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
        for a, b in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_conditioner_holds_several_encoders_and_gives_unet_kwargs():
    a, b = tiny_conditioner().encoders[0], tiny_conditioner().encoders[0]
    both = Conditioner([a, b])
    cond = both.encode(CAPTIONS[:2])
    assert both.hidden_size == 64 and cond["encoder_hidden_states"].shape == (2, 16, 64)
    assert set(Conditioner.unet_kwargs(cond)) == {"encoder_hidden_states"}
    pooled = {**cond, "text_embeds": torch.zeros(2, 8)}
    assert Conditioner.unet_kwargs(pooled)["added_cond_kwargs"]["text_embeds"].shape == (2, 8)
    torch.testing.assert_close(
        both.unconditional(1)["encoder_hidden_states"], both.encode([""])["encoder_hidden_states"]
    )


def test_timestep_range_narrows_the_draws_and_the_default_draws_are_unchanged():
    from ldm.diffusion.registry import build_objective

    ddpm = build_objective(NoiseConfig(timestep_range=[0.2, 0.5]))
    t = ddpm.sample_timesteps(4000, StepRandom(0), torch.device("cpu"))
    assert int(t.min()) == 200 and int(t.max()) == 499  # [lo T, hi T)
    plain = build_objective(NoiseConfig()).sample_timesteps(64, StepRandom(1), torch.device("cpu"))
    assert torch.equal(plain, StepRandom(1).randint(1000, 64))  # no range: the draws as before
    flow = build_objective(NoiseConfig(objective="rectified_flow", timestep_range=[0.5, 1.0]))
    u = flow.sample_timesteps(4000, StepRandom(0), torch.device("cpu"))
    assert float(u.min()) >= 0.5 and float(u.max()) <= 1.0 and float(u.min()) < 0.51
    for bad in ([0.5, 0.5], [0.0, 1.5], [0.2]):
        with pytest.raises(ConfigError, match="timestep_range"):
            NoiseConfig(timestep_range=bad)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_debiased_estimation_weights_the_loss_by_kohyas_formula(prediction):
    from ldm.diffusion.ddpm import compute_snr
    from ldm.diffusion.registry import build_objective

    objective = build_objective(
        NoiseConfig(prediction_type=prediction, debiased_estimation=True, min_snr_gamma=5.0)
    )
    t = torch.tensor([0, 10, 500, 999])
    snr = compute_snr(objective.scheduler, t).clamp(max=1000)
    debias = 1 / snr.sqrt() if prediction == "epsilon" else 1 / (snr + 1)
    min_snr = torch.minimum(compute_snr(objective.scheduler, t), torch.tensor(5.0))
    min_snr = (
        min_snr / compute_snr(objective.scheduler, t)
        if prediction == "epsilon"
        else min_snr / (compute_snr(objective.scheduler, t) + 1)
    )
    assert torch.allclose(objective.loss_weight(t), min_snr * debias, rtol=1e-5)
    with pytest.raises(ConfigError, match="debiased_estimation"):
        NoiseConfig(objective="rectified_flow", debiased_estimation=True)
