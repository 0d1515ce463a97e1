"""Stage 2 end to end on tiny models: caches, resume, frozen pretrained text encoders, export to diffusers."""

import json
import logging

import open_clip
import pytest
import torch
from conftest import NEEDS_COMPILER, tiny_autoencoder
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from conditioning import build_clip_tokenizer
from ldm.core.config import load_config
from ldm.data import build_dataset
from ldm.data.cache import encode_dataset, sample_latents
from ldm.diffusion.registry import build_objective
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.train.config import LDMRunConfig
from ldm.train.diffusion import train_ldm
from ldm.train.models import build_models
from ldm.training.metrics import read_metrics


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A tiny untrained f=2 autoencoder export, as stage 1 would write it."""
    folder = tmp_path_factory.mktemp("vae") / "model"
    vae = tiny_autoencoder(scaling_factor=0.8)
    vae.save_pretrained(folder)
    return folder


def tiny(out, vae, *extra) -> LDMRunConfig:
    return load_config(
        LDMRunConfig,
        None,
        [
            f"output_dir={out}",
            f"vae={vae}",
            "data.resolution=16",
            "data.train_size=64",
            "data.val_size=8",
            "unet.block_out_channels=[32,32]",
            "unet.norm_num_groups=8",
            "text.hidden_size=32",
            "text.num_heads=2",
            "text.intermediate_size=64",
            "train.batch_size=4",
            "train.compile=false",
            "train.max_steps=6",
            "train.lr_warmup_steps=2",
            "train.log_every=1",
            "train.sample_every=3",
            "train.checkpoint_every=2",
            "sample.steps=2",
            "sample.grid_prompts=2",
            "sample.grid_seeds=2",
            "eval.num_samples=4",
            "eval.seeds_per_prompt=2",
            "eval.batch_size=4",
            "eval.bound_strata=5",
            "eval.timestep_points=4",
            *extra,
        ],
    )


def test_run_exports_a_pipeline_diffusers_loads_and_resume_is_exact(tmp_path, tiny_vae):
    full = train_ldm(tiny(tmp_path / "full", tiny_vae))
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (full / "samples" / "step-000003.png").exists() and (full / "losses.png").exists()
    results = json.loads((full / "eval.json").read_text())
    assert (
        set(results) >= {"guidance_1", "guidance_4", "bpd", "loss_per_timestep"}
        and results["num_samples"] == 4
    )
    assert [r["guidance"] for r in results["guidance_sweep"]] == [1, 2, 4, 8]
    report = (full / "report.md").read_text()
    assert "## Guidance sweep" in report and "## Variational bound" in report and "FID/KID skipped" in report
    for png in ("guidance_sweep.png", "guidance_grid.png", "timestep_curves.png", "losses.png"):
        assert (full / png).exists(), png

    pipe = StableDiffusionPipeline.from_pretrained(full / "model", safety_checker=None)
    assert pipe.scheduler.config.clip_sample is False
    # diffusers, on the exported folder as it is, samples what our pipeline samples from it
    ours = LatentDiffusionPipeline.from_pretrained(full / "model")
    prompt = "a red circle on a black background"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = {
        kind: pipe(prompt, num_inference_steps=2, latents=latents, output_type=kind).images
        for kind in ("latent", "pt")
    }
    mine = ours(prompt, num_inference_steps=2, sampler="ddim", latents=latents, output_type="latent").images
    torch.testing.assert_close(mine, theirs["latent"], rtol=0, atol=1e-4)
    assert theirs["pt"].shape == (1, 3, 16, 16)
    torch.testing.assert_close((ours.decode_latents(mine) + 1) / 2, theirs["pt"], rtol=0, atol=1e-4)
    assert (mine - latents).abs().mean() > 0.01  # the steps moved the latents

    train_ldm(tiny(tmp_path / "part", tiny_vae, "train.stop_at=3"))
    assert not (tmp_path / "part" / "model").exists()
    train_ldm(tiny(tmp_path / "part", tiny_vae), resume="latest")
    for sub in ("unet", "text_encoder"):
        a = StableDiffusionPipeline.from_pretrained(full / "model", safety_checker=None).components[sub]
        b = StableDiffusionPipeline.from_pretrained(
            tmp_path / "part" / "model", safety_checker=None
        ).components[sub]
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5, msg=f"{sub}.{name}")


def test_a_rectified_flow_run_exports_a_model_our_pipeline_samples(tmp_path, tiny_vae):
    """noise.objective=rectified_flow end to end: trained, exported with a flow scheduler, evaluated
    without the (DDPM-only) bound, loaded back and sampled."""
    run = train_ldm(tiny(tmp_path / "flow", tiny_vae, "noise.objective=rectified_flow",
                         "noise.timestep_sampling=logit_normal", "sample.sampler=flow-euler"))  # fmt: skip
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 6 and all(r["train/loss"] > 0 for r in rows)
    results = json.loads((run / "eval.json").read_text())
    assert results["objective"] == "rectified_flow" and results["bpd"] is None
    assert len(results["loss_per_timestep"]) == 4 and results["loss_timesteps"][-1] == 1000
    report = (run / "report.md").read_text()
    assert "## Variational bound" not in report and "defined for the DDPM objective only" in report
    scheduler = json.loads((run / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    pipe = LatentDiffusionPipeline.from_pretrained(run / "model")
    out = pipe("a red circle on a black background", num_inference_steps=4, seed=0, output_type="pt")
    assert out.images.shape == (1, 3, 16, 16)


def test_latent_cache_gives_the_same_loss_as_encoding_on_the_fly(tiny_vae):
    cfg = tiny("unused", tiny_vae)
    vae, _, (text_encoder,), unet = build_models(cfg)
    images = build_dataset(cfg.data, "train", cfg.seed)
    cached = encode_dataset(vae, images, batch_size=16)
    idx = list(range(8))
    on_the_fly = {"pixel_values": torch.stack([images[i]["pixel_values"] for i in idx])}
    from_cache = {k: torch.stack([cached[i][k] for i in idx]) for k in ("mean", "std")}
    context = text_encoder.encode([images[i]["caption"] for i in idx]).detach()
    objective = build_objective(cfg.noise)
    losses = []
    for batch in (on_the_fly, from_cache):
        torch.manual_seed(7)
        z0 = sample_latents(batch, vae, torch.device("cpu")) * vae.config.scaling_factor
        losses.append(objective.loss(lambda z_t, t: unet(z_t, t, encoder_hidden_states=context).sample, z0))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_missing_autoencoder_and_channel_mismatch_are_clear(tmp_path, tiny_vae):
    with pytest.raises(
        FileNotFoundError, match="no autoencoder at .*nowhere: run python train_vae.py first, or set vae=PATH"
    ):
        build_models(tiny(tmp_path, tmp_path / "nowhere"))
    pipe = tmp_path / "pipe"
    train_ldm(
        tiny(pipe / "run", tiny_vae, "train.max_steps=1", "train.checkpoint_every=0", "train.sample_every=0")
    )
    wide = AutoencoderKL.from_pretrained(tiny_vae)
    wide = AutoencoderKL.from_config({**wide.config, "latent_channels": 8})
    wide.save_pretrained(pipe / "run" / "model" / "vae")
    with pytest.raises(ValueError, match="8 latent channels but the UNet takes 4"):
        build_models(tiny(tmp_path, tiny_vae, f"pretrained={pipe / 'run' / 'model'}", "vae=null"))


def _tiny_clip_folder(root):
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        hidden_act="quick_gelu",
        pad_token_id=0,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    CLIPTextModel(config).save_pretrained(root)
    build_clip_tokenizer(16).save_pretrained(root)
    return root


def _tiny_open_clip(root):
    name = "ldm-train-test-tiny"
    spec = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (root / f"{name}.json").write_text(json.dumps(spec))
    open_clip.add_model_config(root / f"{name}.json")
    model = open_clip.create_model(name)
    weights = root / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return name, weights


@pytest.mark.parametrize("kind", ["clip", "openclip"])
def test_frozen_pretrained_text_encoders_train_with_the_text_cache(
    tmp_path, tiny_vae, kind, caplog, monkeypatch
):
    import ldm.train.diffusion as train_module
    import ldm.train.setup as setup_module
    from conditioning.openclip import load_open_clip_text

    built, optimized = [], []  # (text model, its weights at the start); the parameters given to AdamW
    build_models_, make_optimizer_ = setup_module.build_models, train_module.make_optimizer

    def recorded_build_models(cfg):
        models = build_models_(cfg)
        text_model = models[2][0].model
        built.append(
            (text_model, {k: v.detach().clone() for k, v in text_model.state_dict().items()}, models[3])
        )
        return models

    def recorded_optimizer(name, params, *args, **kwargs):
        params = list(params)
        optimized.extend(params)
        return make_optimizer_(name, params, *args, **kwargs)

    monkeypatch.setattr(setup_module, "build_models", recorded_build_models)
    monkeypatch.setattr(train_module, "make_optimizer", recorded_optimizer)
    if kind == "clip":
        text = ["text.kind=clip", f"text.name_or_path={_tiny_clip_folder(tmp_path / 'clip')}"]
    else:
        (tmp_path / "oc").mkdir()
        name, weights = _tiny_open_clip(tmp_path / "oc")
        text = ["text.kind=openclip", f"text.name_or_path={name}", f"text.pretrained={weights}"]
    cfg = tiny(tmp_path / "run", tiny_vae, *text, "train.max_steps=3", "train.sample_every=0")
    with caplog.at_level(logging.INFO, logger="ldm"):
        out = train_ldm(cfg)
    cached = [r.getMessage() for r in caplog.records if "text cache:" in r.getMessage()]
    assert cached and int(cached[0].split("text cache: ")[1].split()[0]) > 0
    # frozen: out of the optimizer (which holds exactly the UNet), bit-identical after the steps, exported as loaded
    [(text_model, start, unet)] = built
    text_params = {id(p) for p in text_model.parameters()}
    assert not any(p.requires_grad for p in text_model.parameters())
    assert optimized and not text_params & {id(p) for p in optimized}
    assert [id(p) for p in optimized] == [id(p) for p in unet.parameters()]
    now = text_model.state_dict()
    assert now.keys() == start.keys() and all(torch.equal(now[k], start[k]) for k in start)
    if kind == "clip":
        before = CLIPTextModel.from_pretrained(tmp_path / "clip")
    else:  # the same OpenCLIP weights, converted again
        before = load_open_clip_text(name, str(weights))
    after = CLIPTextModel.from_pretrained(out / "model" / "text_encoder")
    before, after = before.state_dict(), after.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before[k], start[k]) for k in before)


@NEEDS_COMPILER
def test_compiled_training_matches_eager_and_keeps_plain_keys(tmp_path, tiny_vae, caplog):
    """train.compile=true: the losses of an eager run to float tolerance; checkpoints and the export
    hold the UNet's own keys (no ``_orig_mod.``), and a compiled run resumes."""
    short = ["train.max_steps=3", "train.sample_every=0", "train.checkpoint_every=3", "eval.num_samples=0"]
    eager = train_ldm(tiny(tmp_path / "eager", tiny_vae, *short, "train.compile=false"))
    with caplog.at_level(logging.INFO, logger="ldm"):
        compiled = train_ldm(tiny(tmp_path / "compiled", tiny_vae, *short, "train.compile=true"))
    assert "first step, compiling included" in caplog.text
    losses = [[r["train/loss"] for r in read_metrics(run / "metrics.jsonl")] for run in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    unet_file = "model/unet/diffusion_pytorch_model.safetensors"
    assert load_file(compiled / unet_file).keys() == load_file(eager / unet_file).keys()
    checkpoint = compiled / "checkpoints" / "step-000003" / "model.safetensors"
    assert not [k for k in load_file(checkpoint) if "_orig_mod" in k]
    resumed = train_ldm(tiny(tmp_path / "compiled", tiny_vae, *short[1:], "train.max_steps=4", "train.compile=true"),
                        resume="latest")  # fmt: skip
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4]


def test_compile_without_a_compiler_trains_eagerly_and_says_what_to_install(monkeypatch, caplog):
    import ldm.training.compile as compile_mod

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    layer = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        assert compile_mod.compiled_for_training(layer, True, torch.device("cpu")) is layer
    assert "needs a C++ compiler" in caplog.text and "apt-get install g++" in caplog.text
    assert compile_mod.compiled_for_training(layer, False, torch.device("cpu")) is layer
