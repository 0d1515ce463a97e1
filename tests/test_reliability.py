"""Untrusted files, faults during checkpoints, offline runs (issue 7's items not tested next to their code)."""

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import save_tiny_sd_pipeline, tiny_autoencoder
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from test_ldm_train import tiny
from test_vae_train import TINY

from ldm.cli.convert_pickle import main as convert_main
from ldm.core.safe_load import PickleRefusedError, load_state_dict
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.train.diffusion import train_ldm
from ldm.train.models import build_models
from ldm.training.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from ldm.training.ema import EMA

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class Payload:
    """Unpickling this runs code: it creates the file ``target``."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return Path.touch, (self.target,)


# ------------------------------------------------------------------------------ untrusted files
def test_pickle_files_are_refused_unless_allowed_and_then_read_weights_only(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.arange(4.0)}, weights)
    with pytest.raises(PickleRefusedError, match="allow_pickle=True"):
        load_state_dict(weights)
    assert torch.equal(load_state_dict(weights, allow_pickle=True)["w"], torch.arange(4.0))

    evil, target = tmp_path / "evil.pt", tmp_path / "code-ran"
    torch.save({"w": Payload(target)}, evil)
    torch.load(evil, weights_only=False)  # the payload is real: a plain torch.load runs it
    assert target.exists()
    target.unlink()
    with pytest.raises(PickleRefusedError):
        load_state_dict(evil)
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict(evil, allow_pickle=True)  # allowed, but weights_only: the code does not run
    assert not target.exists()

    convert_main([str(weights)])  # python -m ldm.cli.convert_pickle w.pt -> w.safetensors
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.arange(4.0))


def test_pipeline_with_pickle_weights_is_refused_unless_allowed(tmp_path):
    folder = save_tiny_sd_pipeline(tmp_path / "sd")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)  # diffusion_pytorch_model.bin
    with pytest.raises(PickleRefusedError, match=r"unet/diffusion_pytorch_model\.bin"):
        LatentDiffusionPipeline.from_pretrained(folder)
    pipe = LatentDiffusionPipeline.from_pretrained(folder, allow_pickle=True, channels_last=False)
    for a, b in zip(pipe.unet.parameters(), unet.parameters(), strict=True):
        assert torch.equal(a, b)

    cfg = tiny(tmp_path / "run", "unused", f"pretrained={folder}", "data.resolution=48", "vae=null")
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        build_models(cfg)  # train_ldm.py pretrained=... refuses it too
    cfg.allow_pickle = True
    assert torch.equal(next(build_models(cfg)[3].parameters()), next(unet.parameters()))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: shutil.rmtree(f / "tokenizer"), r"missing tokenizer/"),
        (lambda f: (f / "vae" / "config.json").unlink(), r"vae.* has no config\.json"),
        (lambda f: (f / "text_encoder" / "model.safetensors").unlink(), r"text_encoder .*no weights"),
    ],
    ids=["no-tokenizer", "no-vae-config", "no-text-encoder-weights"],
)
def test_pretrained_folder_with_missing_parts(tmp_path, damage, message):
    folder = save_tiny_sd_pipeline(tmp_path / "sd")
    damage(folder)
    with pytest.raises(FileNotFoundError, match=message):
        LatentDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(FileNotFoundError):
        build_models(
            tiny(tmp_path / "run", "unused", f"pretrained={folder}", "data.resolution=48", "vae=null")
        )


def test_trust_remote_code_is_never_set():
    sources = [
        *ROOT.glob("*.py"),
        *(p for d in ("ldm", "autoencoder", "conditioning") for p in (ROOT / d).rglob("*.py")),
    ]
    assert len(sources) > 40
    assert [str(p) for p in sources if "trust_remote_code" in p.read_text()] == []


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture()
def vae_folder(tmp_path):
    folder = tmp_path / "vae"
    tiny_autoencoder(scaling_factor=0.8).save_pretrained(folder)
    return folder


def test_resume_reads_ema_from_safetensors_and_every_torch_file_weights_only(
    tmp_path, vae_folder, monkeypatch
):
    train_ldm(tiny(tmp_path / "run", vae_folder, "train.stop_at=2", "train.sample_every=0"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (checkpoint / "ema.safetensors").exists() and not list(checkpoint.glob("custom_checkpoint*"))
    calls = []
    original = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    train_ldm(
        tiny(tmp_path / "run", vae_folder, "train.max_steps=3", "train.sample_every=0"), resume="latest"
    )
    assert calls and all(w is True for w in calls), calls  # optimizer, scheduler, RNG states


def _accelerated_model(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    accelerator, model, optimizer = _accelerated_model(0)
    ema = EMA(model.parameters(), decay=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    ema.step(model.parameters())
    save_checkpoint(accelerator, tmp_path, 1, {"data": {"epoch": 0}}, keep=3, ema=ema)
    saved = [p.detach().clone() for p in model.parameters()]

    def full_disk(self, output_dir=None, **kwargs):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"step-000002.*disk is full.*step-000001"):
        save_checkpoint(accelerator, tmp_path, 2, {"data": {"epoch": 0}}, keep=3, ema=ema)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]  # partial folder removed
    assert (root / "latest").read_text().strip() == "step-000001"

    accelerator, model, optimizer = _accelerated_model(1)  # other weights, restored from the checkpoint
    restored_ema = EMA(model.parameters(), decay=0.9)
    state = load_checkpoint(accelerator, root / "step-000001", restored_ema)
    assert state["step"] == 1 and state["data"] == {"epoch": 0}
    for a, b in zip(model.parameters(), saved, strict=True):
        assert torch.equal(a, b)
    assert restored_ema.optimization_step == ema.optimization_step
    for a, b in zip(restored_ema.shadow_params, ema.shadow_params, strict=True):
        assert torch.equal(a, b)


KILL_IN_SECOND_SAVE = """
import os, runpy, signal, sys
from pathlib import Path
from accelerate import Accelerator

original, calls = Accelerator.save_state, []

def save_state(self, output_dir=None, **kwargs):
    calls.append(output_dir)
    if len(calls) == 2:  # half-way through the second checkpoint: a file written, then SIGKILL
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, output_dir, **kwargs)

Accelerator.save_state = save_state
sys.argv = ["train_vae.py", *sys.argv[1:]]
runpy.run_path("train_vae.py", run_name="__main__")
"""


def test_sigkill_during_a_checkpoint_write_leaves_latest_valid(tmp_path):
    args = [a for a in TINY if not a.startswith("train.sample_every")] + ["train.sample_every=0"]
    killed = [f"output_dir={tmp_path / 'killed'}", *args]
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_SAVE, *killed], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = tmp_path / "killed" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-000002"
    assert (root / "step-000002" / "trainer_state.json").exists() and (root / ".tmp-step-000004").exists()

    script = str(ROOT / "train_vae.py")
    resumed = subprocess.run(
        [sys.executable, script, *killed, "--resume", "latest"], cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and not (root / ".tmp-step-000004").exists()
    straight = subprocess.run(
        [sys.executable, script, f"output_dir={tmp_path / 'straight'}", *args], cwd=ROOT
    )
    assert straight.returncode == 0
    a = load_file(tmp_path / "killed" / "model" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "straight" / "model" / "diffusion_pytorch_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


# ------------------------------------------------------------------------------ offline
NO_NETWORK = """
import json, runpy, socket, sys
from pathlib import Path

attempts = []

def hook(event, args):
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        attempts.append(f"{event} {args[0]!r}")
    elif event == "socket.connect" and not isinstance(args[1], (str, bytes)):  # AF_UNIX paths are local
        attempts.append(f"{event} {args[1]!r}")

sys.addaudithook(hook)
try:  # the hook sees a lookup
    socket.getaddrinfo("selfcheck.invalid", 80)
except OSError:
    pass
assert attempts == ["socket.getaddrinfo 'selfcheck.invalid'"], attempts
attempts.clear()

out = Path(sys.argv[1])
import autoencoder, conditioning, ldm, ldm.pipelines.latent_diffusion  # noqa: E401,F401  import time
for script, args in json.loads(sys.argv[2]):
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:  # the entry scripts end with sys.exit(main())
        assert not done.code, f"{script} exited with {done.code}"
pipe = ldm.LatentDiffusionPipeline.from_pretrained(out / "ldm" / "model")
pipe("a red circle on a black background", num_inference_steps=2, height=16, width=16)
(out / "attempts.json").write_text(json.dumps(attempts))
"""


def test_with_the_offline_variables_nothing_touches_the_network(tmp_path):
    vae_args = [f"output_dir={tmp_path / 'vae'}", *TINY, "train.sample_every=0"]
    ldm_args = [
        f"output_dir={tmp_path / 'ldm'}", f"vae={tmp_path / 'vae' / 'model'}", "data.resolution=16",
        "data.train_size=32", "data.val_size=8", "unet.block_out_channels=[32,32]", "unet.norm_num_groups=8",
        "text.hidden_size=32", "text.num_heads=2", "text.intermediate_size=64", "train.batch_size=4",
        "train.max_steps=2", "train.sample_every=0", "sample.steps=2", "sample.grid_prompts=1",
        "sample.grid_seeds=1", "eval.num_samples=2", "eval.batch_size=2", "train.compile=false",
    ]  # fmt: skip
    runs = json.dumps([["train_vae.py", vae_args], ["train_ldm.py", ldm_args]])
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, str(tmp_path), runs],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "attempts.json").read_text()) == []
