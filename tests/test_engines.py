"""Stage 2 under FSDP2 and DeepSpeed ZeRO-2 on 2 CPU processes (gloo): the same export, losses,
validation loss and sample grids as one process with the same global batch, and a resume that
equals the run it continues.

DeepSpeed starts on the CPU as it is launched by users (``configs/accelerate/deepspeed-zero2.yaml``;
ldm names the gloo backend, which accelerate leaves unset without CUDA). accelerate starts FSDP on
accelerators only, so here ``bench/fsdp_on_cpu.py`` sets accelerate's state to FSDP after
``Accelerator()`` is built, with the plugin that ``configs/accelerate/fsdp.yaml`` configures: from there
on, accelerate's own FSDP2 code runs (``fully_shard``, the state-dict gathers, distributed
checkpoints), and so does ours.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_autoencoder
from PIL import Image
from safetensors.torch import load_file
from test_distributed import LDM, LR, assert_close

from ldm.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {"fsdp": "fsdp.yaml", "deepspeed": "deepspeed-zero2.yaml"}
# validation and grids every 2 steps: collectives under FSDP (every process joins each forward)
ARGS = [*LDM, LR, "train.val_every=2", "train.val_items=8", "train.sample_every=2"]
MODEL = ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]


def run(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def engine_launch(tmp: Path, engine: str, out: Path, args: list[str]) -> str:
    """``accelerate launch --config_file configs/accelerate/<engine> --num_processes 2 train_ldm.py``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = ["train_ldm.py"]
    if engine == "fsdp":
        script, env["ACCELERATE_USE_CPU"] = [str(ROOT / "bench" / "fsdp_on_cpu.py"), "train_ldm.py"], "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / CONFIGS[engine]), "--num_processes", "2",
           "--mixed_precision", "no", *script, f"output_dir={out}", "train.batch_size=2", *args]  # fmt: skip
    return run(cmd, env)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "model"
    tiny_autoencoder(scaling_factor=0.8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, vae_folder):
    """The reference: one process, batch 4 (the global batch of 2 x 2), text encoder trained or frozen."""
    runs = {}

    def reference(text_train: bool) -> Path:
        if text_train not in runs:
            out = tmp_path_factory.mktemp("one") / "run"
            args = [f"vae={vae_folder}", *ARGS, f"text.train={str(text_train).lower()}"]
            run(
                [sys.executable, "train_ldm.py", f"output_dir={out}", "train.batch_size=4", *args],
                dict(os.environ),
            )
            runs[text_train] = out
        return runs[text_train]

    return reference


def grid(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.parametrize("engine,text_train", [("fsdp", True), ("deepspeed", True)])
def test_two_processes_equal_one_and_resume(engine, text_train, tmp_path, vae_folder, one_process):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is the optional `deepspeed` extra")
    one = one_process(text_train)
    out = tmp_path / engine
    args = [f"vae={vae_folder}", *ARGS, f"text.train={str(text_train).lower()}"]
    if text_train:  # stopped at step 3 (a checkpoint), then resumed to 4
        log = engine_launch(tmp_path, engine, out, [*args, "train.stop_at=3"])
        resumed = engine_launch(tmp_path, engine, out, [*args, "--resume", "latest"])
        assert "resumed from" in resumed and "at step 3" in resumed
    else:
        log = engine_launch(tmp_path, engine, out, args)
    assert "global batch 4 (2 per process x 2 processes x 1 accumulation)" in log
    subfolders = MODEL if text_train else MODEL[:1]
    for sub in subfolders:  # the export: whole weights (FSDP: gathered), the EMA's
        assert_close(load_file(out / "model" / sub), load_file(one / "model" / sub), atol=1e-5)
    lines = {n: read_metrics(folder / "metrics.jsonl") for n, folder in ((1, one), (2, out))}
    assert [r["step"] for r in lines[2]] == [r["step"] for r in lines[1]] == [1, 2, 3, 4]
    for a, b in zip(lines[1], lines[2], strict=True):
        for key in ("train/loss", "val/loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), (key, a, b)
    for name in ("step-000002.png", "step-000004.png", "final.png"):  # grids with the EMA weights
        assert np.abs(grid(out / "samples" / name) - grid(one / "samples" / name)).max() <= 1


def test_fsdp_launch_on_the_cpu_is_refused_not_run_as_ddp(monkeypatch, fresh_accelerate_state):
    """accelerate launch --config_file fsdp.yaml --cpu would train as plain data parallel: refused."""
    from accelerate import Accelerator

    from ldm.core.errors import ConfigError
    from ldm.training.engine import check_engine

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="asked for FSDP, but accelerate runs NO"):
        check_engine(Accelerator(cpu=True))
