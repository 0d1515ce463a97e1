"""Seam-free tiled decoding: tiles for memory, GroupNorm statistics of the whole image.

Decoding a large latent in tiles bounds memory, but a GroupNorm that sees one tile normalises with
that tile's mean and variance instead of the image's, and tiles come out in different tones; blending
them over an overlap (diffusers' tiling) hides the seams but not the shift: 19-29 dB from untiled
decoding on our models. Here the decoder's up path runs as stages that end at each GroupNorm:

1. ``post_quant_conv``, ``conv_in`` and the mid block (whose attention is global) run on the whole
   latent: at 1/f of the image size it is small;
2. the up blocks and the output layers run tile by tile, one stage at a time. Each tile carries
   ``pad`` latent pixels of context on every side, so that its convolutions see what they would see
   untiled (``pad`` defaults to the up path's receptive radius), and only its core is kept;
3. at the end of a stage every tile adds its core's statistics to the GroupNorm that starts the next
   (Chan et al.'s parallel mean and variance), and the next stage normalises all tiles with those of
   the whole image. Between stages the tiles wait on the CPU (``offload``), so the accelerator holds
   one tile at a time.

The result equals untiled decoding up to float rounding. Cost: each tile's padding,
((tile + 2 pad) / tile)^2 of the untiled work, and with ``offload`` two copies per GroupNorm of the
up path's activations between devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from torch import nn

# one step of the up path on a tile's (x, residual) pair, or a GroupNorm that needs global statistics
Local = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]
Step = Local | nn.GroupNorm


@dataclass(frozen=True)
class Span:
    """One tile along one axis, in latent pixels: the core [start, end) inside the context [lo, hi)."""

    start: int
    end: int
    lo: int
    hi: int


def tile_spans(size: int, tile: int, pad: int) -> list[Span]:
    """Cores of at most ``tile`` pixels covering [0, size), each padded by ``pad`` within the image."""
    return [
        Span(s, min(s + tile, size), max(s - pad, 0), min(s + tile + pad, size)) for s in range(0, size, tile)
    ]


def group_norm_with_stats(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, norm: nn.GroupNorm
) -> torch.Tensor:
    """GroupNorm y = (x - mu_g) / sqrt(var_g + eps) * gamma + beta with given mu, var of shape (B, G)."""
    b, c = x.shape[:2]
    xg = x.reshape(b, norm.num_groups, -1).float()
    y = ((xg - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
    if norm.affine:
        y = y * norm.weight.float().view(1, c, 1, 1) + norm.bias.float().view(1, c, 1, 1)
    return y.to(x.dtype)


class GroupStats:
    """Per-(sample, group) mean and variance merged over tile cores (Chan et al. 1979):
    n = n_a + n_b, d = mu_b - mu_a, mu = mu_a + d n_b / n, M2 = M2_a + M2_b + d^2 n_a n_b / n."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        xg = x.reshape(x.shape[0], self.groups, -1).float()
        n_b = xg.shape[-1]
        var_b, mu_b = torch.var_mean(xg, dim=-1, correction=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mu_b, var_b * n_b
            return
        n = self.n + n_b
        d = mu_b - self.mean
        self.mean = self.mean + d * (n_b / n)
        self.m2 = self.m2 + var_b * n_b + d.square() * (self.n * n_b / n)
        self.n = n

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.n


def _resnet_steps(resnet: nn.Module) -> list[Step]:
    """diffusers' ResnetBlock2D without a time embedding, as steps:
    y = (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))) / output_scale_factor."""
    if resnet.upsample is not None or resnet.downsample is not None or resnet.time_emb_proj is not None:
        raise ValueError("tiled decoding supports resnets without resampling or a time embedding")
    act = resnet.nonlinearity
    shortcut = resnet.conv_shortcut or nn.Identity()
    return [
        lambda x, r: (x, x),  # keep the block's input for the shortcut
        resnet.norm1,
        lambda x, r: (resnet.conv1(act(x)), r),
        resnet.norm2,
        lambda x, r: (resnet.conv2(resnet.dropout(act(x))), r),
        lambda x, r: ((shortcut(r) + x) / resnet.output_scale_factor, None),
    ]


def up_path_steps(vae: AutoencoderKL) -> list[Step]:
    """The decoder after its mid block (up blocks, norm, act, conv_out) as a list of steps."""
    dec = vae.decoder
    if not isinstance(dec.conv_norm_out, nn.GroupNorm):
        raise ValueError(
            "tiled decoding needs a decoder whose output norm is a GroupNorm (not a spatial norm)"
        )
    steps: list[Step] = []
    for block in dec.up_blocks:
        if type(block).__name__ != "UpDecoderBlock2D":
            raise ValueError(
                f"tiled decoding supports UpDecoderBlock2D up blocks, not {type(block).__name__}"
            )
        for resnet in block.resnets:
            steps += _resnet_steps(resnet)
        for up in block.upsamplers or []:
            steps.append(lambda x, r, up=up: (up(x), r))
    steps += [dec.conv_norm_out, lambda x, r: (dec.conv_out(dec.conv_act(x)), r)]
    return steps


def receptive_radius(vae: AutoencoderKL) -> int:
    """Latent pixels of context a tile needs for its core to be exact: each 3x3 convolution at scale
    2^i over the latent reaches 1 / 2^i latent pixels further."""
    radius = 0.0
    for i, block in enumerate(vae.decoder.up_blocks):
        radius += 2 * len(block.resnets) / 2**i  # two 3x3 convolutions per resnet
        radius += len(block.upsamplers or []) / 2 ** (i + 1)  # the upsampler's conv, after doubling
    radius += 1 / 2 ** (len(vae.decoder.up_blocks) - 1)  # conv_out
    return math.ceil(radius)


def default_tile(vae: AutoencoderKL) -> int:
    """Latent pixels per tile: the training size, but at least 4 pads, so that the context costs at
    most ((4 + 2) / 4)^2 = 2.25x (SD's f8 decoder: 64 latent pixels, pad 13: 1.98x)."""
    f = 2 ** (len(vae.decoder.up_blocks) - 1)
    return max(vae.config.sample_size // f, 4 * receptive_radius(vae))


@dataclass
class _Tile:
    rows: Span
    cols: Span
    x: torch.Tensor
    res: torch.Tensor | None = None

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """The core of an activation of this tile, at whatever scale over the latent it has."""
        s = x.shape[-2] // (self.rows.hi - self.rows.lo)
        y0, x0 = self.rows.start - self.rows.lo, self.cols.start - self.cols.lo
        y1, x1 = self.rows.end - self.rows.lo, self.cols.end - self.cols.lo
        return x[..., y0 * s : y1 * s, x0 * s : x1 * s]


def _stages(steps: list[Step]) -> list[tuple[nn.GroupNorm | None, list[Local]]]:
    """Split steps at each GroupNorm: [(norm that starts the stage or None, local steps after it)]."""
    stages: list[tuple[nn.GroupNorm | None, list[Local]]] = [(None, [])]
    for step in steps:
        if isinstance(step, nn.GroupNorm):
            stages.append((step, []))
        else:
            stages[-1][1].append(step)
    return stages


@torch.no_grad()
def decode_tiled(
    vae: AutoencoderKL, z: torch.Tensor, tile: int, pad: int | None = None, offload: bool = True
) -> torch.Tensor:
    """Decode unscaled latents z (B, C, h, w) -> images (B, 3, h f, w f) in tiles of ``tile`` latent
    pixels with ``pad`` pixels of context (default: the receptive radius, exact); ``offload`` keeps
    waiting tiles on the CPU."""
    pad = receptive_radius(vae) if pad is None else pad
    if tile < 1 or pad < 0:
        raise ValueError(f"tile={tile}, pad={pad}: give a tile of at least 1 latent pixel and pad >= 0")
    stages = _stages(up_path_steps(vae))
    dec, device = vae.decoder, z.device
    store = torch.device("cpu") if offload else device
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    h = dec.mid_block(dec.conv_in(z), None)  # (B, C', h, w): small, and its attention is global
    tiles = [
        _Tile(r, c, h[..., r.lo : r.hi, c.lo : c.hi].to(store))
        for r in tile_spans(h.shape[-2], tile, pad)
        for c in tile_spans(h.shape[-1], tile, pad)
    ]
    del h
    stats: GroupStats | None = None
    for i, (norm, local) in enumerate(stages):
        next_norm = stages[i + 1][0] if i + 1 < len(stages) else None
        next_stats = GroupStats(next_norm.num_groups) if next_norm is not None else None
        for t in tiles:
            x, res = t.x.to(device), None if t.res is None else t.res.to(device)
            if norm is not None:
                x = group_norm_with_stats(x, stats.mean, stats.var, norm)
            for step in local:
                x, res = step(x, res)
            if next_stats is not None:
                next_stats.add(t.core(x))
            t.x, t.res = x.to(store), None if res is None else res.to(store)
        stats = next_stats
    f = 2 ** (len(dec.up_blocks) - 1)
    out = torch.empty(
        *tiles[0].x.shape[:2], z.shape[-2] * f, z.shape[-1] * f, dtype=tiles[0].x.dtype, device=device
    )
    for t in tiles:
        out[..., t.rows.start * f : t.rows.end * f, t.cols.start * f : t.cols.end * f] = t.core(t.x).to(
            device
        )
    return out
