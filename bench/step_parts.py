"""The pieces of the stage-2 step that this project does differently from diffusers' example, each
timed against the example's way in one run (median of ``--repeats`` calls, default config).

    python bench/step_parts.py [--repeats 20] [--out bench/results/step_parts.json]

- optimizer: fused AdamW (``ldm.training.optim.adamw``) vs ``torch.optim.AdamW`` defaults;
- EMA: one-pass lerp (``ldm.training.ema.EMA``) vs diffusers' ``EMAModel`` (per tensor, as the example);
- text encoder forward and backward on a batch of training captions: each distinct caption once
  (``deduplicate=True``) vs every row;
- gradient clipping: ``ldm.training.optim.clip_gradients`` vs ``clip_grad_norm_``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from conditioning import drop_captions
from ldm.core.config import CONFIG_DIR, load_config
from ldm.data import build_dataset
from ldm.train.config import LDMRunConfig
from ldm.train.models import build_models
from ldm.training.ema import EMA
from ldm.training.optim import adamw, clip_gradients


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_parts.json"))
    args = parser.parse_args(argv)
    cfg = load_config(LDMRunConfig, CONFIG_DIR / "ldm/shapes.yaml", [])
    torch.manual_seed(0)
    _, _, (text, *_), unet = build_models(cfg)
    params = [*unet.parameters(), *text.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-4
    data = build_dataset(cfg.data, "train", cfg.seed)
    captions = drop_captions([data[i]["caption"] for i in range(cfg.train.batch_size)], cfg.text.p_uncond)
    ids = text.tokenize(captions)
    fused = adamw(params, 1e-4, (0.9, 0.999), 0.01)
    default = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    ours_ema, their_ema = EMA(params, decay=0.999), EMAModel(params, decay=0.999)
    accelerator = Accelerator(cpu=True)

    def text_step(dedup: bool):
        return lambda: text(ids, deduplicate=dedup).sum().backward()

    pairs = {
        "optimizer": (lambda: fused.step(), lambda: default.step()),
        "ema": (lambda: ours_ema.step(params), lambda: their_ema.step(params)),
        "text_encoder_fwd_bwd": (text_step(True), text_step(False)),
        "clip": (lambda: clip_gradients(accelerator, params, 1.0), lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)),
    }  # fmt: skip
    results = {}
    for name, (ours, theirs) in pairs.items():
        a, b = median_ms(ours, args.repeats), median_ms(theirs, args.repeats)
        results[name] = {"ours_ms": a, "example_ms": b, "saved_ms": b - a}
        sys.stdout.write(f"{name:22s} ours {a:6.1f} ms, the example's way {b:6.1f} ms: {b / a:.2f}x\n")
    results["distinct_captions"] = f"{len(set(captions))} of {len(captions)}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
