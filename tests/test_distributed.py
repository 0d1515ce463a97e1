"""Both trainers under ``accelerate launch`` with 2 CPU processes (gloo) against 1 process, same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NEEDS_COMPILER, tiny_autoencoder
from safetensors.torch import load_file

from ldm.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent

# Runs a training script, then saves every prepared model of every rank when accelerate ends training.
DRIVER = """
import runpy, sys
from accelerate import Accelerator
from safetensors.torch import save_file

script, dump = sys.argv[1], sys.argv[2]
original = Accelerator.end_training

def end_training(self):
    for i, model in enumerate(self._models):
        state = self.unwrap_model(model).state_dict()
        save_file({k: v.detach().contiguous() for k, v in state.items()}, f"{dump}/rank{self.process_index}-model{i}.safetensors")
    original(self)

Accelerator.end_training = end_training
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""

LDM = ["data.resolution=16", "data.train_size=64", "data.val_size=8", "unet.block_out_channels=[32,32]",
       "unet.norm_num_groups=8", "text.hidden_size=32", "text.num_heads=2", "text.intermediate_size=64",
       "train.max_steps=4", "train.lr_warmup_steps=2", "train.log_every=1", "train.sample_every=0",
       "train.checkpoint_every=2", "sample.steps=2", "sample.grid_prompts=1", "sample.grid_seeds=1",
       "eval.num_samples=0", "train.compile=false"]  # fmt: skip
VAE = ["data.resolution=16", "data.train_size=64", "data.val_size=8", "model.block_out_channels=[8,8]",
       "model.norm_num_groups=4", "loss.disc_start=2", "loss.disc_channels=8", "train.max_steps=4",
       "train.lr_warmup_steps=2", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=2",
       "train.ema_decay=0.9", "eval.num_samples=8", "eval.scale_samples=16", "loss.disc_norm=group"]  # fmt: skip
# The discriminator uses GroupNorm here: PyTorch has no SyncBatchNorm on the CPU, so BatchNorm would
# normalise each process's half batch on its own (on GPUs the trainer converts it to SyncBatchNorm).
# Adam turns float-rounding differences of near-zero gradients into differences of up to lr per
# step; at lr 1e-4 four steps stay within 1e-5 (the difference grows linearly with lr).
LR = "train.lr=1e-4"


def launch(tmp: Path, script: str, processes: int, batch: int, args: list[str]) -> tuple[Path, str]:
    out = tmp / f"{Path(script).stem}-{processes}"
    dump = tmp / f"dump-{Path(script).stem}-{processes}"
    dump.mkdir()
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    train = [str(driver), script, str(dump), f"output_dir={out}", f"train.batch_size={batch}", LR, *args]
    if processes == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               *train]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dump, proc.stderr


def launch_two_machines(tmp: Path, script: str, args: list[str], port: int) -> Path:
    """``configs/accelerate/multi-node.yaml`` as two machines of one process each, both on this one:
    two ``accelerate launch`` commands, ``--machine_rank`` 0 and 1, the main process on 127.0.0.1."""
    out, dump = tmp / f"{Path(script).stem}-machines", tmp / f"dump-{Path(script).stem}-machines"
    dump.mkdir()
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    train = [str(driver), script, str(dump), f"output_dir={out}", "train.batch_size=2", LR, *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(ROOT / "configs" / "accelerate" / "multi-node.yaml"),
                "--num_processes",
                "2",
                "--num_machines",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                *train,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(tmp / f"machine{rank}.log").open("w"),  # a full pipe would block one machine
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for rank, proc in enumerate(procs):
        proc.wait(timeout=600)
        assert proc.returncode == 0, (tmp / f"machine{rank}.log").read_text()[-3000:]
    return dump


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "model"
    tiny_autoencoder(scaling_factor=0.8).save_pretrained(folder)
    return folder


VAL = ["train.val_every=2", "train.val_batch_size=3"]  # the validation loss, in fixed chunks


def stage_args(stage: str, vae_folder: Path) -> tuple[str, list[str]]:
    """(script, arguments) of a stage's 4-step run."""
    if stage == "vae":
        return "train_vae.py", [*VAE, *VAL]
    return "train_ldm.py", [*LDM, f"vae={vae_folder}", *VAL]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, vae_folder):
    """stage -> (dump, run folder) of its one-process run with batch 4, launched once for the tests
    that compare against it."""
    runs = {}

    def reference(stage: str) -> tuple[Path, Path]:
        if stage not in runs:
            script, args = stage_args(stage, vae_folder)
            tmp = tmp_path_factory.mktemp(f"one-{stage}")
            runs[stage] = (
                launch(tmp, script, processes=1, batch=4, args=args)[0],
                tmp / f"{Path(script).stem}-1",
            )
        return runs[stage]

    return reference


@pytest.mark.parametrize("stage", ["ldm", "ldm-disk-cache", "vae"])
def test_two_processes_equal_one_with_the_same_global_batch(stage, tmp_path, vae_folder, one_process):
    script, args = stage_args("vae" if stage == "vae" else "ldm", vae_folder)
    if stage == "ldm-disk-cache":  # the 2 processes write the shards and read their rows (1: in memory)
        args += [f"cache_dir={tmp_path / 'cache'}", "cache_shard_items=16"]
    two, log = launch(tmp_path, script, processes=2, batch=2, args=args)
    one, one_run = one_process("vae" if stage == "vae" else "ldm")
    assert "global batch 4 (2 per process x 2 processes x 1 accumulation)" in log
    assert log.count("global batch 4") == 1  # logged by rank 0 only
    models = sorted(p.name.split("-", 1)[1] for p in two.glob("rank0-*"))
    assert models and models == sorted(p.name.split("-", 1)[1] for p in one.glob("rank0-*"))
    for name in models:
        rank0, rank1 = load_file(two / f"rank0-{name}"), load_file(two / f"rank1-{name}")
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), f"ranks differ in {name}"
        assert_close(rank0, load_file(one / f"rank0-{name}"), atol=1e-5)
    # the validation loss of two processes is that of one (the weights agree to 1e-5, see above)
    val = {n: [r for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r]
           for n, run in ((1, one_run), (2, tmp_path / f"{Path(script).stem}-2"))}  # fmt: skip
    assert [r["step"] for r in val[2]] == [r["step"] for r in val[1]] == [2, 4]
    for a, b in zip(val[1], val[2], strict=True):
        assert abs(a["val/loss"] - b["val/loss"]) < 1e-5 * max(1.0, abs(a["val/loss"]))


@pytest.mark.parametrize("stage", ["ldm"])  # (the vae stage: two processes on one machine, above)
def test_two_machines_on_loopback_equal_one_process(stage, tmp_path, vae_folder, one_process):
    script, args = stage_args(stage, vae_folder)
    machines = launch_two_machines(tmp_path, script, args, port=29_600 + (stage == "vae"))
    one, _ = one_process(stage)
    names = sorted(p.name.split("-", 1)[1] for p in machines.glob("rank0-*"))
    assert names and names == sorted(p.name.split("-", 1)[1] for p in one.glob("rank0-*"))
    for name in names:
        rank0, rank1 = load_file(machines / f"rank0-{name}"), load_file(machines / f"rank1-{name}")
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), f"machines differ in {name}"
        assert_close(rank0, load_file(one / f"rank0-{name}"), atol=1e-5)


@NEEDS_COMPILER
@pytest.mark.skipif(
    os.environ.get("LDM_SLOW_TESTS") != "1",
    reason="slow (about a minute on a fresh machine: inductor compiles under DDP); LDM_SLOW_TESTS=1 runs it",
)
def test_two_compiled_processes_equal_one(tmp_path, vae_folder, one_process):
    """train.compile=true under DDP: the compiled UNet runs inside the DDP module, whose gradient hooks still
    average over processes; the weights equal one (eager) process's with the same global batch."""
    script, args = stage_args("ldm", vae_folder)
    two, log = launch(tmp_path, script, processes=2, batch=2, args=[*args, "train.compile=true"])
    one, _ = one_process("ldm")
    assert "first step, compiling included" in log
    models = sorted(p.name.split("-", 1)[1] for p in two.glob("rank0-*"))
    assert models
    for name in models:
        assert_close(load_file(two / f"rank0-{name}"), load_file(one / f"rank0-{name}"), atol=1e-5)
