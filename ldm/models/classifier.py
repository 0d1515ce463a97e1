"""The noise-conditional classifier of classifier guidance (Dhariwal & Nichol 2021, section 4).

p_phi(y | z_t, t): a small convolutional encoder (diffusers' ``ResnetBlock2D`` with the timestep
embedding added in each block, as the UNet's down half has it), global average pooling, and one
linear head per attribute (shapes: color, shape, background), each a softmax over its classes. It is
trained on noised latents (or pixels) z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps of the noise
schedule of the model it will guide, which its config keeps (``alphas_cumprod``).

Labels come from captions: a head's label for a caption is the one class word of the head that
appears in it as a whole word (``caption_labels``).
"""

from __future__ import annotations

import re

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor, nn

NO_LABEL = -1  # a caption with none (or several) of a head's class words: no loss on that head


class NoiseConditionalClassifier(ModelMixin, ConfigMixin):
    """(z_t (B, C, h, w), t (B,)) -> {head: logits (B, classes)}."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        sample_size: int = 8,
        heads: dict[str, list[str]] | None = None,
        block_out_channels: tuple[int, ...] = (64, 128),
        layers_per_block: int = 1,
        norm_num_groups: int = 16,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
    ):
        super().__init__()
        if not heads:
            raise ValueError("heads: give at least one head, {name: [class, ...]}")
        width = block_out_channels[0]
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, 4 * width)
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        blocks: list[nn.Module] = []
        channels = width
        for level, out in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                blocks.append(ResnetBlock2D(in_channels=channels, out_channels=out, temb_channels=4 * width,
                                            groups=norm_num_groups))  # fmt: skip
                channels = out
            if level < len(block_out_channels) - 1:
                blocks.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))  # (halves the side)
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(norm_num_groups, channels)
        self.head_layers = nn.ModuleDict(
            {name: nn.Linear(channels, len(classes)) for name, classes in heads.items()}
        )

    def forward(self, sample: Tensor, timestep: Tensor) -> dict[str, Tensor]:
        t = timestep.expand(sample.shape[0]) if timestep.ndim == 0 else timestep
        temb = self.time_embedding(self.time_proj(t.to(sample.device)).to(sample.dtype))
        h = self.conv_in(sample)
        for block in self.blocks:
            h = block(h, temb) if isinstance(block, ResnetBlock2D) else block(h)
        pooled = torch.nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))  # (B, channels)
        return {name: head(pooled) for name, head in self.head_layers.items()}

    @property
    def alphas_cumprod(self) -> Tensor:
        """The noise schedule it was trained on (diffusers' DDPMScheduler of its config)."""
        from diffusers import DDPMScheduler

        c = self.config
        return DDPMScheduler(
            num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
            beta_start=c.beta_start, beta_end=c.beta_end,
        ).alphas_cumprod  # fmt: skip


def caption_labels(captions: list[str], heads: dict[str, list[str]]) -> dict[str, Tensor]:
    """{head: (N,) class indices}: the one class word of each head found in each caption as a whole
    word (case ignored); ``NO_LABEL`` where there is none or more than one."""
    words = [set(re.findall(r"[\w-]+", c.lower())) for c in captions]
    out = {}
    for name, classes in heads.items():
        index = {c.lower(): i for i, c in enumerate(classes)}
        labels = []
        for w in words:
            found = [index[c] for c in w if c in index]
            labels.append(found[0] if len(found) == 1 else NO_LABEL)
        out[name] = torch.tensor(labels, dtype=torch.long)
    return out


def log_likelihood(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    """sum over heads of log p(y_h | z_t), per sample (B,); heads with ``NO_LABEL`` add nothing."""
    total = None
    for name, y in targets.items():
        x = logits[name]
        log_p = torch.log_softmax(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
        picked = log_p.gather(1, y.clamp(min=0)[:, None].to(log_p.device))[:, 0]
        picked = torch.where(y.to(log_p.device) >= 0, picked, torch.zeros_like(picked))
        total = picked if total is None else total + picked
    return total
