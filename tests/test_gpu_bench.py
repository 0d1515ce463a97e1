"""bench/gpu.py --tiny: the GPU check's code paths on the CPU, so that it cannot rot while no GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_tiny_on_the_cpu_and_fills_every_field(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["tiny"] is True and results["bf16_peak_flops"] > 0
    assert [r["resolution"] for r in results["train"]] == [32, 64]
    for row in results["train"]:
        assert row["flops_per_step"] > 0 and row["batch"] >= 1
        for name in ("ours_eager", "ours_compiled", "reference"):
            assert row[name]["images_per_s"] > 0 and "peak_memory_bytes" in row[name]
        assert 0 < row["ours_compiled"]["mfu"] < 1 and row["reference"]["mfu"] is None
        assert row["ratio_compiled"] > 0
    backends = results["attention"]["backends"]
    assert set(backends) == {"sdpa", "xformers", "math"}
    assert backends["xformers"]["skipped"] and backends["sdpa"]["train_vs_sdpa"] == 1.0
    assert backends["math"]["sample_call_s"] > 0
    rows = results["sampling"]["rows"]
    assert [(r["batch"], r["compiled"]) for r in rows] == [(1, False), (2, False), (1, True), (2, True)]
    # the same components, sampler, latents and guidance: the same images as diffusers' pipeline
    assert all(r["max_abs_image_diff"] < 1e-3 and r["ours_vs_diffusers_eager"] > 0 for r in rows)
    sdxl = results["sdxl_lora"]
    assert 0 < sdxl["trained_parameters"] < sdxl["unet_parameters"] and sdxl["step_s"] > 0
    assert sdxl["rank"] == 16 and sdxl["batch"] == 1
    tiles = results["tiled_decode"]
    assert tiles["tiled"]["seconds"] > 0 and tiles["untiled"]["oom"] is False
    assert "| train 64 px" in done.stdout and "| decode 128 px" in done.stdout
