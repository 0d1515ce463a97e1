"""``LatentDiffusionPipeline``: text to image with classifier-free guidance, the public API.

prompts -> context (and the unconditional context of the negative prompts, "" by default)
-> z_T ~ N(0, I) from seeded generators -> per step one UNet call on [uncond; cond],
eps = eps_u + s (eps_c - eps_u) -> scheduler step -> D(z_0 / scaling_factor) -> images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from conditioning.tokenizer import clean_caption
from ldm.images import to_uint8
from ldm.samplers import make_scheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def guided_prediction(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = eps_u + s (eps_c - eps_u)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


@dataclass
class PipelineOutput:
    images: list[Image.Image] | np.ndarray | torch.Tensor


class LatentDiffusionPipeline:
    """Autoencoder + text encoder + UNet + a noise-schedule config; samplers are chosen per call."""

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler_config: dict[str, Any],
    ):
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> LatentDiffusionPipeline:
        """Load our exported folder or a diffusers Stable Diffusion 1.x/2.x folder (safetensors)."""
        from diffusers import DDPMScheduler

        root = Path(path)
        missing = [
            p for p in ("vae", "unet", "text_encoder", "tokenizer", "scheduler") if not (root / p).is_dir()
        ]
        if missing:
            raise FileNotFoundError(f"{root} is not a pipeline folder: missing {', '.join(missing)}/")
        kw = {"use_safetensors": True}
        pipe = cls(
            vae=AutoencoderKL.from_pretrained(root / "vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(root / "unet", **kw),
            scheduler_config=DDPMScheduler.load_config(root / "scheduler"),
        )
        return pipe.to(device, dtype)

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> LatentDiffusionPipeline:
        for module in (self.vae, self.text_encoder, self.unet):
            if device is not None or dtype is not None:
                module.to(device=device, dtype=dtype)
            module.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------ pieces
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context (B, L, D) from the text encoder's last hidden state."""
        ids = self.tokenizer(
            [clean_caption(p) for p in prompts],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """z_0 (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1]."""
        z = latents / self.vae.config.scaling_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.clamp(-1, 1)

    def _initial_latents(self, n: int, height: int, width: int, seeds: list[int | None]) -> torch.Tensor:
        """z_T: one CPU generator per image, so an image depends on its own seed only."""
        shape = (
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        noise = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            noise.append(torch.randn(shape, generator=gen))
        return torch.stack(noise)[:n].to(self.device, self.dtype)  # (n, C, h, w)

    # ------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        eta: float = 0.0,
        seed: int | list[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: bool = True,
    ) -> PipelineOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: the prompt list is empty; give at least one prompt")
        negatives = [""] * len(prompts) if negative_prompt is None else negative_prompt
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt: {len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt"
            )
        if num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps is {num_inference_steps}; it must be > 0")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type is {output_type!r}; allowed: {' | '.join(OUTPUT_TYPES)}")
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default_size, width or default_size
        for name, side in (("height", height), ("width", width)):
            if side % self.vae_scale_factor:
                raise ValueError(
                    f"{name} is {side}; it must be a multiple of the VAE factor {self.vae_scale_factor}"
                )

        n = len(prompts) * num_images_per_prompt
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [p for p in negatives for _ in range(num_images_per_prompt)]
        if isinstance(seed, list):
            if len(seed) != n:
                raise ValueError(
                    f"seed: {len(seed)} seeds for {n} images; give one per image or a single int"
                )
            seeds = seed
        else:
            seeds = [None] * n if seed is None else [seed + i for i in range(n)]

        scheduler = make_scheduler(sampler, self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        guided = guidance_scale > 1.0
        context = self.encode_prompt(negatives + prompts if guided else prompts)  # (2n or n, L, D)
        if latents is None:
            latents = self._initial_latents(n, height, width, seeds)
        latents = latents.to(self.device, self.dtype) * scheduler.init_noise_sigma
        step_kwargs = {"eta": eta} if "eta" in _step_params(scheduler) else {}
        generator = (
            torch.Generator(device=self.device).manual_seed(seeds[0]) if seeds[0] is not None else None
        )
        if "generator" in _step_params(scheduler):
            step_kwargs["generator"] = generator

        for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False):
            model_in = torch.cat([latents, latents]) if guided else latents  # (2n, C, h, w): [uncond; cond]
            model_in = scheduler.scale_model_input(model_in, t)
            pred = self.unet(model_in, t, encoder_hidden_states=context).sample
            if guided:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = guided_prediction(pred_uncond, pred_cond, guidance_scale)
            latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            return PipelineOutput(images=latents)
        images = self.decode_latents(latents).float().cpu()  # (n, 3, H, W) in [-1, 1]
        if output_type == "pt":
            return PipelineOutput(images=images)
        arrays = to_uint8(images)
        if output_type == "np":
            return PipelineOutput(images=arrays)
        return PipelineOutput(images=[Image.fromarray(a) for a in arrays])


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)
