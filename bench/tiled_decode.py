"""Tiled against untiled decoding of one large latent, in one run: time, peak memory (CUDA), PSNR.

    python bench/tiled_decode.py [--vae runs/vae-shapes/model] [--scale 8] [--tile-size PIXELS]
        [--out bench/results/tiled_decode.json]

The latent is ``scale`` times the autoencoder's training size per side, made by encoding a mosaic of
shapes images so that it looks like the latents the decoder sees.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ldm.eval.quality import psnr
from ldm.models.autoencoder import downsampling_factor
from ldm.pipelines.tiled_decode import decode_tiled, default_tile, receptive_radius


def _timed(fn, device: torch.device) -> tuple[torch.Tensor, float, int]:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return out, time.perf_counter() - t0, peak


def main(argv: list[str] | None = None) -> int:
    from ldm.data.shapes import ShapesDataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="runs/vae-shapes/model")
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--tile-size", type=int, default=None, help="pixels (default: as the pipeline)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tiled_decode.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval()
    size = vae.config.sample_size
    f = downsampling_factor(vae)
    tile = args.tile_size // f if args.tile_size else default_tile(vae)
    shapes = ShapesDataset(size=args.scale**2, resolution=size, split="val")
    mosaic = torch.cat([torch.cat([shapes[r * args.scale + c]["pixel_values"] for c in range(args.scale)], -1)
                        for r in range(args.scale)], -2)[None].to(device)  # fmt: skip
    with torch.no_grad():
        z = vae.encode(mosaic).latent_dist.mode()
        decode_tiled(vae, z[..., : 2 * tile, : 2 * tile], tile)  # warm-up
        full, t_full, m_full = _timed(lambda: vae.decode(z).sample, device)
        tiled, t_tiled, m_tiled = _timed(lambda: decode_tiled(vae, z, tile), device)
        vae.enable_tiling()  # diffusers' blended tiles of the same size, for comparison
        vae.tile_latent_min_size, vae.tile_sample_min_size = tile, tile * f
        blended = vae.decode(z).sample
        vae.disable_tiling()

    def quality_of(x: torch.Tensor) -> float:
        return psnr(x.clamp(-1, 1).float().cpu(), full.clamp(-1, 1).float().cpu()).item()

    quality = quality_of(tiled)
    results = {
        "vae": args.vae, "device": args.device, "image_px": mosaic.shape[-1], "tile_latent": tile,
        "pad_latent": receptive_radius(vae), "untiled_s": t_full, "tiled_s": t_tiled,
        "time_ratio": t_tiled / t_full, "untiled_peak_bytes": m_full, "tiled_peak_bytes": m_tiled,
        "psnr_db": quality, "diffusers_tiling_psnr_db": quality_of(blended), "max_abs_diff": (tiled - full).abs().max().item(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    memory = f", peak memory {m_tiled / 2**20:.0f} vs {m_full / 2**20:.0f} MiB" if m_full else ""
    sys.stdout.write(
        f"{mosaic.shape[-1]} px decode on {args.device}: tiled {t_tiled:.3f} s vs untiled {t_full:.3f} s "
        f"({results['time_ratio']:.2f}x){memory}; PSNR {quality:.1f} dB, max difference {results['max_abs_diff']:.1e} "
        f"(diffusers' blended tiles: {results['diffusers_tiling_psnr_db']:.1f} dB)\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
