"""Model FLOPs utilisation of the stage-2 training step, against this machine's measured matmul peak.

    MFU = (FLOPs of one UNet + text-encoder forward and backward) / step time / peak FLOP/s

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
attention; elementwise work is not counted, as is usual for MFU). The peak is the best FLOP/s of
square fp32 (or ``--dtype``) matmuls of a few sizes on the same device, measured in the same run.

    python bench/mfu.py [--batch 64] [--steps 10] [--out bench/results/mfu.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm.core.config import CONFIG_DIR, load_config
from ldm.diffusion.registry import build_objective
from ldm.train.config import LDMRunConfig
from ldm.train.models import build_models
from ldm.training.optim import adamw

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best FLOP/s over square matmuls of sides 1024..4096 (2 n^3 FLOPs each)."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync(device)
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            count += 1
        sync(device)
        best = max(best, 2 * n**3 * count / (time.perf_counter() - t0))
    return best


def training_step(
    cfg: LDMRunConfig, batch: int, device: torch.device, dtype: torch.dtype, count_flops: bool = True
) -> tuple[Callable[[], None], int]:
    """One stage-2 step (UNet and text encoder forward and backward, fused AdamW) on random latents,
    and its FLOPs counted once (0 without ``count_flops``)."""
    torch.manual_seed(0)
    _, _, (text, *_), unet = build_models(cfg)
    unet.to(device, memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)
    text.to(device)
    params = [p for p in [*unet.parameters(), *text.parameters()] if p.requires_grad]
    optimizer = adamw(params, 1e-4, (0.9, 0.999), 0.0)
    objective = build_objective(cfg.noise)
    channels, side = unet.config.in_channels, unet.config.sample_size
    z0 = torch.randn(batch, channels, side, side, device=device)
    ids = text.tokenize(["a caption of the usual length for this model"] * batch).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward_backward() -> None:
        with autocast:
            context = text(ids)
            loss = objective.loss(lambda z_t, t: unet(z_t, t, encoder_hidden_states=context).sample, z0)
        loss.backward()

    def step() -> None:
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if not count_flops:
        return step, 0
    with FlopCounterMode(display=False) as counter:
        forward_backward()
    optimizer.zero_grad(set_to_none=True)
    return step, counter.get_total_flops()


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step after one warm-up step."""
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="autocast dtype on CUDA")
    parser.add_argument("--config", default=str(CONFIG_DIR / "ldm/shapes.yaml"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/mfu.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = load_config(LDMRunConfig, args.config, args.overrides)
    step, flops = training_step(cfg, args.batch, device, dtype)
    step_time = time_steps(step, args.steps, device)
    peak = matmul_peak(device, dtype)
    achieved = flops / step_time
    results = {
        "device": str(device), "dtype": args.dtype, "batch": args.batch, "config": args.config,
        "flops_per_step": flops, "step_time_s": step_time, "achieved_flops": achieved,
        "matmul_peak_flops": peak, "mfu": achieved / peak, "threads": torch.get_num_threads(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.write(
        f"UNet + text encoder training step, batch {args.batch} on {device} ({args.dtype}): "
        f"{flops / 1e9:.1f} GFLOP in {step_time * 1000:.0f} ms = {achieved / 1e9:.1f} GFLOP/s; "
        f"measured matmul peak {peak / 1e9:.1f} GFLOP/s; MFU {results['mfu']:.1%}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
