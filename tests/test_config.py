"""Configs: presets, overrides, unknown keys and wrong types."""

import subprocess
import sys
from pathlib import Path

import pytest

from autoencoder.config import VAERunConfig
from ldm.core.config import CONFIG_DIR, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shapes_preset_equals_the_defaults():
    assert load_config(VAERunConfig, CONFIG_DIR / "vae/shapes.yaml") == VAERunConfig()


def test_gpu_preset_loads_with_a_data_path():
    cfg = load_config(VAERunConfig, CONFIG_DIR / "vae/kl-f8-256.yaml", ["data.path=/data/images"])
    assert cfg.model.downsample_factor == 8 and cfg.data.resolution == 256


def test_overrides_are_typed():
    cfg = load_config(VAERunConfig, None, ["train.max_steps=7", "train.lr=0.5", "data.holdout=[red circle]"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.5 and cfg.data.holdout == ["red circle"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.nonexistent=1", ["train.nonexistent", "batch_size"]),
        ("nonexistent=1", ["nonexistent"]),
        ("train.batch_size=abc", ["train.batch_size", "abc"]),
        ("data.dataset=imagenet", ["data.dataset", "shapes | folder | csv | hf"]),
        ("data.dataset=folder", ["data.path"]),
        ("train.mixed_precision=fp8", ["train.mixed_precision"]),
        ("max_steps", ["key=value"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(VAERunConfig, None, [override])
    for word in words:
        assert word in str(err.value)


def test_missing_preset_file():
    with pytest.raises(ConfigError, match="no config file"):
        load_config(VAERunConfig, "nope.yaml")


def test_cli_rejects_a_bad_key_and_dry_run_prints_sizes():
    bad = subprocess.run(
        [sys.executable, "train_vae.py", "train.nonexistent=1"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "train.nonexistent" in bad.stderr
    dry = subprocess.run(
        [sys.executable, "train_vae.py", "--dry-run", "train.max_steps=9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert "max_steps: 9" in dry.stdout and "autoencoder: 0.2" in dry.stdout


def test_ldm_presets():
    from ldm.train.config import LDMRunConfig

    assert load_config(LDMRunConfig, CONFIG_DIR / "ldm/shapes.yaml") == LDMRunConfig()
    cfg = load_config(LDMRunConfig, CONFIG_DIR / "ldm/txt2img-256.yaml", ["data.path=/data/images"])
    assert cfg.text.kind == "clip" and cfg.unet.block_out_channels == [320, 640, 1280, 1280]
    with pytest.raises(ConfigError, match="noise.prediction_type"):
        load_config(LDMRunConfig, None, ["noise.prediction_type=x0"])
    with pytest.raises(ConfigError, match="unet.cross_attention"):
        load_config(LDMRunConfig, None, ["unet.cross_attention=[true]"])


def test_train_ldm_without_an_autoencoder_says_what_to_do(tmp_path):
    run = subprocess.run(
        [sys.executable, "train_ldm.py", f"vae={tmp_path / 'none'}", f"output_dir={tmp_path / 'out'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "run python train_vae.py first, or set vae=PATH" in run.stderr


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["noise.zero_terminal_snr=true"], ["v_prediction"]),
        (["data.flip=true"], ["cache_latents", "data.flip=false"]),
        (["data.crop=random"], ["data.crop=center"]),
        (["data.dataset=hf", "data.path=x", "data.streaming=true"], ["cache_latents=false"]),
        (["train.log_every=0"], ["train.log_every"]),
    ],
)
def test_ldm_config_rejects_combinations_that_cannot_work(overrides, words):
    from ldm.train.config import LDMRunConfig

    with pytest.raises(ConfigError) as err:
        load_config(LDMRunConfig, None, overrides)
    for word in words:
        assert word in str(err.value)
    assert load_config(
        LDMRunConfig, None, ["noise.zero_terminal_snr=true", "noise.prediction_type=v_prediction"]
    )
    assert load_config(LDMRunConfig, None, ["data.flip=true", "cache_latents=false"])


@pytest.mark.parametrize(
    "stage, override, words",
    [
        ("vae", "train.lr=-1", ["'train.lr'", "-1.0", "> 0"]),
        ("vae", "train.lr=nan", ["'train.lr'", "nan"]),
        ("vae", "train.batch_size=0", ["'train.batch_size'", "0", ">= 1"]),
        ("vae", "train.max_steps=-5", ["'train.max_steps'", "-5", ">= 1"]),
        ("vae", "train.ema_decay=-0.1", ["'train.ema_decay'", "-0.1", "[0, 1)"]),
        ("vae", "train.ema_decay=1", ["'train.ema_decay'", "1.0", "[0, 1)"]),
        ("vae", "train.gradient_accumulation_steps=0", ["'train.gradient_accumulation_steps'", ">= 1"]),
        ("vae", "train.adam_beta2=1", ["'train.adam_beta2'", "[0, 1)"]),
        ("vae", "train.weight_decay=-0.01", ["'train.weight_decay'", ">= 0"]),
        ("vae", "train.stop_at=0", ["'train.stop_at'", ">= 1"]),
        ("vae", "train.mixed_precision=fp8", ["'train.mixed_precision'", "'fp8'", "no | fp16 | bf16"]),
        ("vae", "data.resolution=0", ["'data.resolution'", "0", ">= 8"]),
        ("vae", "data.resolution=30", ["'data.resolution'", "30", "multiple", "factor 4"]),
        ("vae", "data.num_workers=-1", ["'data.num_workers'", ">= 0"]),
        ("vae", "loss.kl_weight=-1", ["'loss.kl_weight'", ">= 0"]),
        ("vae", "loss.perceptual_weight=-0.5", ["'loss.perceptual_weight'", ">= 0"]),
        ("vae", "loss.disc_weight=-1", ["'loss.disc_weight'", ">= 0"]),
        ("vae", "loss.disc_lr=0", ["'loss.disc_lr'", "> 0"]),
        ("vae", "model.latent_channels=0", ["'model.latent_channels'", ">= 1"]),
        ("vae", "eval.num_samples=0", ["'eval.num_samples'", ">= 1"]),
        ("ldm", "text.p_uncond=1.5", ["'text.p_uncond'", "1.5", "[0, 1)"]),
        ("ldm", "text.p_uncond=-0.1", ["'text.p_uncond'", "[0, 1)"]),
        ("ldm", "sample.sampler=foo", ["'sample.sampler'", "'foo'", "ddim", "dpm++2m", "unipc"]),
        ("ldm", "sample.steps=0", ["'sample.steps'", ">= 1"]),
        ("ldm", "noise.beta_end=1.5", ["'noise.beta_end'", "(0, 1)"]),
        ("ldm", "noise.min_snr_gamma=-1", ["'noise.min_snr_gamma'", ">= 0"]),
        ("ldm", "lora.dropout=1", ["'lora.dropout'", "[0, 1)"]),
        ("ldm", "lora.rank=-1", ["'lora.rank'", ">= 0"]),
        ("ldm", "eval.seeds_per_prompt=0", ["'eval.seeds_per_prompt'", ">= 1"]),
        ("ldm", "unet.layers_per_block=0", ["'unet.layers_per_block'", ">= 1"]),
    ],
)
def test_values_that_cannot_work_are_refused_where_the_config_is_read(stage, override, words):
    from ldm.train.config import LDMRunConfig

    with pytest.raises(ConfigError) as err:
        load_config(VAERunConfig if stage == "vae" else LDMRunConfig, None, [override])
    for word in words:
        assert word in str(err.value)


def test_bounds_at_their_edges():
    from ldm.core.config import TrainConfig, check_bounds
    from ldm.train.config import LDMRunConfig

    cfg = load_config(
        LDMRunConfig,
        None,
        ["train.ema_decay=0", "text.p_uncond=0", "train.lr_warmup_steps=0", "train.min_lr_ratio=1",
         "lora.rank=0", "data.resolution=8", "train.sample_every=0", "eval.num_samples=0"],
    )  # fmt: skip
    assert cfg.train.ema_decay == 0 and cfg.text.p_uncond == 0 and cfg.data.resolution == 8
    check_bounds("train", TrainConfig(stop_at=None))  # an unset optional key passes
    with pytest.raises(ConfigError, match=r"'model.block_out_channels' is \[16, 0\]; it must be >= 1"):
        load_config(VAERunConfig, None, ["model.block_out_channels=[16,0]"])
