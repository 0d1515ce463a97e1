"""Configs: presets, overrides, unknown keys and wrong types."""

import subprocess
import sys
from pathlib import Path

import pytest

from autoencoder.config import VAERunConfig
from ldm.config import CONFIG_DIR, ConfigError, load_config

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
    from ldm.diffusion.config import LDMRunConfig

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
    assert run.returncode == 1 and "run python train_vae.py first, or set vae=PATH" in run.stderr


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
    from ldm.diffusion.config import LDMRunConfig

    with pytest.raises(ConfigError) as err:
        load_config(LDMRunConfig, None, overrides)
    for word in words:
        assert word in str(err.value)
    assert load_config(
        LDMRunConfig, None, ["noise.zero_terminal_snr=true", "noise.prediction_type=v_prediction"]
    )
    assert load_config(LDMRunConfig, None, ["data.flip=true", "cache_latents=false"])
