"""``train.optimizer``: each one resumes exactly (stopped at N and resumed to 2N equals a run to 2N),
the optional ones name their extra when missing, schedule-free refuses an lr schedule."""

import sys

import pytest
import torch
from conftest import tiny_autoencoder
from safetensors.torch import load_file
from test_ldm_train import tiny

from ldm.core.config import TrainConfig
from ldm.core.errors import ConfigError
from ldm.train.diffusion import train_ldm
from ldm.training.metrics import read_metrics
from ldm.training.optim import make_optimizer

SETTINGS = {  # each optimizer at an lr it trains with
    "adamw": ["train.lr=1e-3"],
    "adafactor": ["train.lr=1e-3"],
    "prodigy": ["train.lr=1.0"],
    "schedulefree": ["train.lr=1e-3", "train.lr_schedule=constant"],
}


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "model"
    tiny_autoencoder(scaling_factor=0.8).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_optimizer_resumes_exactly(name, tmp_path, vae):
    # the validation loss every 2 steps: schedule-free switches to its average and back around it
    args = [f"train.optimizer={name}", *SETTINGS[name], "eval.num_samples=0", "train.checkpoint_every=3",
            "train.sample_every=0", "train.val_every=2"]  # fmt: skip
    whole = train_ldm(tiny(tmp_path / "whole", vae, *args))
    train_ldm(tiny(tmp_path / "parts", vae, *args, "train.stop_at=3"))
    parts = train_ldm(tiny(tmp_path / "parts", vae, *args), resume="latest")
    losses = [r["train/loss"] for r in read_metrics(whole / "metrics.jsonl")]
    assert len(losses) == 6 and losses == [r["train/loss"] for r in read_metrics(parts / "metrics.jsonl")]
    unet = "model/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(whole / unet), load_file(parts / unet)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_free_exports_its_averaged_weights(tmp_path, vae):
    """The export holds the optimizer's average x (eval mode), the checkpoint the y it steps (train
    mode, what a resume continues from); without EMA, which would take the export's place."""
    args = ["train.optimizer=schedulefree", *SETTINGS["schedulefree"], "eval.num_samples=0",
            "train.sample_every=0", "train.ema_decay=0"]  # fmt: skip
    out = train_ldm(tiny(tmp_path / "run", vae, *args))
    x = load_file(out / "model/unet/diffusion_pytorch_model.safetensors")
    y = load_file(out / "checkpoints/step-000006/model.safetensors")
    y = {k.removeprefix("unet."): v for k, v in y.items() if k.startswith("unet.")}
    assert x.keys() == y.keys() and max((x[k] - y[k]).abs().max().item() for k in x) > 1e-6
    params = [torch.nn.Parameter(torch.randn(8))]  # and eval() then train() gives y back
    optimizer = make_optimizer("schedulefree", params, 0.1, (0.9, 0.999), 0.0)
    optimizer.train()
    for _ in range(3):
        params[0].grad = torch.randn(8)
        optimizer.step()
    stepped = params[0].detach().clone()
    optimizer.eval()
    optimizer.train()
    assert torch.allclose(params[0], stepped, atol=1e-6)


def test_optional_optimizers_name_their_extra(monkeypatch):
    for module in ("prodigyopt", "schedulefree"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises
    for name, extra in (("prodigy", "prodigy"), ("schedulefree", "schedulefree")):
        with pytest.raises(ConfigError, match=rf"\.\[{extra}\]"):
            make_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], 1.0, (0.9, 0.999), 0.0)


def test_schedule_free_refuses_an_lr_schedule():
    with pytest.raises(ConfigError, match="lr_schedule=constant"):
        TrainConfig(optimizer="schedulefree", lr_schedule="cosine")
