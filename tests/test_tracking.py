"""Trackers (train.report_to) and the deterministic validation loss (train.val_every), both stages."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import tiny_autoencoder
from test_ldm_train import tiny as tiny_ldm
from test_vae_train import tiny_config as tiny_vae

from autoencoder.train import train_autoencoder
from ldm.core.config import ConfigError, load_config
from ldm.data import build_dataset
from ldm.diffusion.registry import build_objective
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.train.config import LDMRunConfig
from ldm.train.diffusion import train_ldm
from ldm.train.validation import LatentValidation, band_names
from ldm.training.metrics import read_metrics
from ldm.training.validation import over_processes, stratified_fractions

TRACKED = ["train.val_every=2", "train.sample_every=2", "train.ema_decay=0.9"]


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "model"
    tiny_autoencoder(scaling_factor=0.8).save_pretrained(folder)
    return folder


def tensorboard_events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "ldm"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, vae_folder):
    out = tmp_path_factory.mktemp("tracked") / "ldm"
    return train_ldm(tiny_ldm(out, vae_folder, "train.report_to=tensorboard", *TRACKED))


def test_ldm_trainer_writes_tensorboard_events_tensorboard_reads(ldm_run):
    events = tensorboard_events(ldm_run)
    scalars = events.Tags()["scalars"]
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/step_time",
        "val/loss",
        "val/loss_t000-249",
    ):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4, 6]
    rows = {r["step"]: r for r in read_metrics(ldm_run / "metrics.jsonl")}
    assert [round(e.value, 5) for e in events.Scalars("val/loss")] == [
        round(rows[s]["val/loss"], 5) for s in (2, 4, 6)
    ]
    grids = events.Images("samples")
    assert [g.step for g in grids] == [2, 4, 6] and grids[0].width > 16


def test_validation_loss_falls_and_its_bands_cover_the_schedule(ldm_run):
    rows = [r for r in read_metrics(ldm_run / "metrics.jsonl") if "val/loss" in r]
    assert rows[-1]["val/loss"] < rows[0]["val/loss"]
    bands = [k for k in rows[0] if k.startswith("val/loss_t")]
    assert bands == ["val/loss_t000-249", "val/loss_t250-499", "val/loss_t500-749", "val/loss_t750-999"]
    mean_of_bands = sum(rows[0][b] for b in bands) / len(bands)  # equal strata: the bands weigh alike
    assert abs(mean_of_bands - rows[0]["val/loss"]) < 1e-6


def test_vae_trainer_writes_tensorboard_events(tmp_path):
    out = train_autoencoder(tiny_vae(tmp_path / "vae", "train.report_to=tensorboard", "train.val_every=2"))
    events = tensorboard_events(out)
    scalars = events.Tags()["scalars"]
    for tag in ("train/rec_loss", "train/grad_norm", "val/loss", "val/rec_loss", "val/kl_loss"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4, 6]
    assert [g.step for g in events.Images("samples")] == [3, 6]  # the reconstruction grids


def test_wandb_offline_writes_an_offline_run(tmp_path, vae_folder, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = train_ldm(tiny_ldm(tmp_path / "run", vae_folder, "train.report_to=wandb", *TRACKED))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"val/loss" in history and b"train/loss" in history
    assert len(list((runs[0] / "files" / "media" / "images").glob("samples_*.png"))) == 3


def test_report_to_is_checked():
    with pytest.raises(ConfigError, match="report_to"):
        load_config(LDMRunConfig, None, ["train.report_to=mlflow"])


# --- the validation loss itself ---------------------------------------------------------------
def test_stratified_fractions_put_one_draw_in_each_stratum():
    u = stratified_fractions(40, seed=3)
    assert sorted((u * 40).floor().long().tolist()) == list(range(40))
    assert torch.equal(u, stratified_fractions(40, seed=3))


def validation_of(ldm_run, batch: int) -> tuple[LatentValidation, LatentDiffusionPipeline]:
    pipe = LatentDiffusionPipeline.from_pretrained(ldm_run / "model", channels_last=False)
    cfg = load_config(LDMRunConfig, ldm_run / "config.yaml", [])
    val_set = build_dataset(cfg.data, "val", cfg.seed)
    objective = build_objective(cfg.noise)
    return LatentValidation(val_set, pipe.vae, objective, 8, 4, batch, cfg.seed), pipe


class Ranks(SimpleNamespace):
    """An accelerator of ``num_processes`` ranks, run one after another in this process: ``reduce``
    sums what each rank computed, as the collective would."""

    device = torch.device("cpu")
    distributed_type = DistributedType.MULTI_CPU  # data parallel: each rank computes its rows

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def reduce(self, rows, op):
        assert op == "sum"
        return rows


def run_ranks(count: int, width: int, compute, processes: int) -> torch.Tensor:
    total = torch.zeros(count, width, dtype=torch.float64)
    for rank in range(processes):
        total += over_processes(Ranks(process_index=rank, num_processes=processes), count, width, compute)
    return total


def test_two_evaluations_of_the_same_weights_are_equal_and_any_process_count_gives_the_same(ldm_run):
    validation, pipe = validation_of(ldm_run, batch=6)
    accelerator = Ranks(process_index=0, num_processes=1)
    first = validation(accelerator, pipe.unet, pipe.conditioner)
    second = validation(accelerator, pipe.unet, pipe.conditioner)
    first.pop("val/time"), second.pop("val/time")
    assert first == second
    assert len(validation) == 32 and set(first) == {"val/loss", *band_names(validation.objective)}

    parts = [range(i, min(i + 6, 32)) for i in range(0, 32, 6)]

    def chunk(c):
        return validation._chunk_losses(parts[c], pipe.unet, pipe.conditioner, accelerator.autocast)

    one = run_ranks(len(parts), 6, chunk, processes=1)
    for processes in (2, 3):
        assert torch.equal(run_ranks(len(parts), 6, chunk, processes=processes), one)
    assert abs(one.flatten()[:32].mean().item() - first["val/loss"]) < 1e-12


def test_validation_uses_the_ema_weights(ldm_run):
    from ldm.training.ema import EMA

    validation, pipe = validation_of(ldm_run, batch=8)
    accelerator = Ranks(process_index=0, num_processes=1)
    params = [p for p in pipe.unet.parameters()]
    ema = EMA(params, decay=0.5)  # its shadow: the weights as they are now
    plain = validation(accelerator, pipe.unet, pipe.conditioner)["val/loss"]
    before = [p.detach().clone() for p in params]
    for p in params:  # train the live weights away; the EMA keeps the old ones
        p.data.add_(0.05 * torch.randn_like(p))
    moved = validation(accelerator, pipe.unet, pipe.conditioner)["val/loss"]
    with_ema = validation(accelerator, pipe.unet, pipe.conditioner, ema, params)["val/loss"]
    assert moved != plain
    assert abs(with_ema - plain) < 1e-9
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))  # restored after


def test_resumed_run_continues_the_tracker_without_repeating_steps(tmp_path, vae_folder):
    first = tiny_ldm(tmp_path / "run", vae_folder, "train.report_to=tensorboard", *TRACKED, "train.stop_at=4")
    train_ldm(first)
    out = train_ldm(tiny_ldm(tmp_path / "run", vae_folder, "train.report_to=tensorboard", *TRACKED), "latest")
    events = tensorboard_events(out)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4, 6]


def test_wandb_run_id_is_kept_for_a_resume_only(tmp_path):
    from ldm.training.trackers import wandb_run_id

    first = wandb_run_id(tmp_path, 0)
    assert wandb_run_id(tmp_path, 500) == first  # resumed: the same wandb run
    assert wandb_run_id(tmp_path, 0) != first  # a new run in the same folder: a new one
