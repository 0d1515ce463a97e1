"""``LatentDiffusionPipeline``: text to image with classifier-free guidance, the public API.

prompts -> context (and the unconditional context of the negative prompts, "" by default)
-> z_T ~ N(0, I) from seeded generators -> per step one UNet call on [uncond; cond],
eps = eps_u + s (eps_c - eps_u) -> scheduler step -> D(z_0 / scaling_factor) -> images.

img2img starts from a noised encoding of ``image`` part-way down the schedule (``strength``);
inpainting (any model) re-imposes the known region, noised to the current level, after every
step (latent blending), so only the region where ``mask`` is 1 is generated.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from conditioning.tokenizer import clean_caption
from ldm.errors import MissingFileError
from ldm.images import to_uint8
from ldm.safe_load import PICKLE_SUFFIXES, check_model_folder, from_pretrained_kwargs, pickle_refused
from ldm.samplers import make_scheduler

logger = logging.getLogger("ldm")

# As diffusers' pipelines: "pil" images, "np" float32 (n, H, W, 3) and "pt" float32 (n, 3, H, W) in
# [0, 1], "latent" the final latents; and ours, "pt_signed": (n, 3, H, W) in [-1, 1] as the decoder
# gives it (what our grids, metrics and the shapes reader take).
OUTPUT_TYPES = ("pil", "np", "pt", "latent", "pt_signed")
ImageInput = Image.Image | np.ndarray | torch.Tensor


def guided_prediction(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = eps_u + s (eps_c - eps_u)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def rescale_guidance(guided: torch.Tensor, pred_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eqs. 15-16): match the per-sample std of the guided
    prediction to the conditional one, x_rescaled = x_cfg * std(x_c) / std(x_cfg), then blend
    phi * x_rescaled + (1 - phi) * x_cfg. Counters over-exposure at high guidance."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (pred_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def to_image_tensor(image: ImageInput | list[ImageInput]) -> torch.Tensor:
    """PIL / uint8 array (H, W, C) / tensor in [-1, 1] (C, H, W) or a list of them -> (B, C, H, W) in [-1, 1]."""
    if isinstance(image, list):
        return torch.cat([to_image_tensor(i) for i in image])
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / 127.5 - 1 if image.dtype == np.uint8 else image.astype(np.float32)
        tensor = torch.from_numpy(array)
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # (C, H, W)
    else:
        tensor = image.float()
    return tensor[None] if tensor.ndim == 3 else tensor


PIPELINE_PARTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_folder(path: str | Path, parts: tuple[str, ...] = PIPELINE_PARTS) -> Path:
    """``path`` if it holds a diffusers pipeline's ``parts``, else a ``MissingFileError`` (a
    ``FileNotFoundError``) saying what to do."""
    root = Path(path)
    if not root.is_dir():
        raise MissingFileError(f"no model at {root}: the folder does not exist")
    missing = [p for p in parts if not (root / p).is_dir()]
    if missing:
        raise MissingFileError(
            f"{root} is not a diffusers pipeline folder: missing {', '.join(m + '/' for m in missing)}; "
            "give the model/ folder of a train_ldm.py run or a Stable Diffusion folder"
        )
    return root


def to_mask_tensor(mask: ImageInput | list[ImageInput]) -> torch.Tensor:
    """An inpainting mask -> (B, 1, H, W) in [0, 1], 1 where to generate: PIL or uint8 scaled by 1/255,
    float or bool arrays and tensors taken as they are (values must lie in [0, 1])."""
    if isinstance(mask, list):
        return torch.cat([to_mask_tensor(m) for m in mask])
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(
            mask.astype(np.float32) / 255 if mask.dtype == np.uint8 else mask.astype(np.float32)
        )
    m = mask.float()
    if m.ndim == 3 and m.shape[-1] in (1, 3) and m.shape[0] not in (1, 3):  # (H, W, C)
        m = m.permute(2, 0, 1)
    m = m[None, None] if m.ndim == 2 else (m[None] if m.ndim == 3 else m)
    m = m[:, :1]  # (B, 1, H, W)
    if m.min() < 0 or m.max() > 1:
        raise ValueError(
            f"mask: values in [{m.min():.2f}, {m.max():.2f}]; give a mask in [0, 1] (1 = generate)"
        )
    return m


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
        self._tiling: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------ loading, saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        attention: str = "auto",
        compile: bool = False,
        compile_vae: bool = False,
        channels_last: bool = True,
        vae: str | Path | AutoencoderKL | None = None,
        allow_pickle: bool = False,
    ) -> LatentDiffusionPipeline:
        """Load our exported folder or a diffusers Stable Diffusion 1.x/2.x folder.

        ``attention``: auto (xformers when installed on CUDA, else PyTorch SDPA) | sdpa | xformers | math.
        ``compile``: ``torch.compile`` the UNet, in place (pays off on GPUs over many calls);
        ``compile_vae``: the VAE decoder too.
        ``channels_last``: UNet and VAE convolutions in NHWC, which oneDNN and cuDNN run faster
        (5% per UNet call on the shapes model on the CPU; same images to float rounding).
        ``vae``: another autoencoder (a folder or a model) with the same latent space, e.g. one
        whose decoder was fine-tuned (``train_vae.py train.decoder_only=true``).
        ``allow_pickle``: weights are read from safetensors; a part with only pickle weights
        (``.bin``) raises ``PickleRefusedError`` unless this is True, and is then read with
        ``weights_only=True`` (``ldm.safe_load``).
        """
        from diffusers import DDPMScheduler

        root = check_pipeline_folder(path)
        vae_dir = Path(vae) if isinstance(vae, (str, Path)) else root / "vae"
        parts = {"unet": root / "unet", "text_encoder": root / "text_encoder"}
        checks = parts if isinstance(vae, AutoencoderKL) else {"vae": vae_dir, **parts}
        for what, folder in checks.items():
            check_model_folder(folder, allow_pickle, what)
        kw = from_pretrained_kwargs(allow_pickle)
        if not isinstance(vae, AutoencoderKL):
            vae = AutoencoderKL.from_pretrained(vae_dir, **kw)
        pipe = cls(
            vae=vae,
            text_encoder=CLIPTextModel.from_pretrained(parts["text_encoder"], **kw),
            tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(parts["unet"], **kw),
            scheduler_config=DDPMScheduler.load_config(root / "scheduler"),
        )
        pipe.to(device, dtype)
        if channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        pipe.set_attention(attention)
        if compile:  # in place: the module and its state dict stay as they are
            pipe.unet.compile()
        if compile_vae:
            pipe.vae.decoder.compile()
        return pipe

    def save_pretrained(self, path: str | Path) -> Path:
        """Save as a diffusers ``StableDiffusionPipeline`` folder (safetensors), atomically."""
        import shutil

        from ldm.io import replace_dir

        folder = Path(path)
        sd = self.as_diffusers()
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        sd.save_pretrained(tmp, safe_serialization=True)
        replace_dir(tmp, folder)
        return folder

    def as_diffusers(self):
        """A diffusers ``StableDiffusionPipeline`` sharing these modules (no copies): diffusers' own
        code for what it already does well (LoRA loading and fusing, saving)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=getattr(self.unet, "_orig_mod", self.unet),  # unwrap torch.compile
            # DDIM on the same noise schedule, clip_sample off: latents are not confined to [-1, 1]
            scheduler=DDIMScheduler.from_config(self.scheduler_config, clip_sample=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    # ------------------------------------------------------------------------------ LoRA
    def load_lora_weights(
        self,
        path: str | Path,
        scale: float = 1.0,
        adapter_name: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        """Add the LoRA adapters of a diffusers LoRA folder or ``.safetensors`` file (ours from
        ``train_ldm.py lora.rank=R``, or any SD 1.x/2.x LoRA) to the UNet and text encoder, at ``scale``.
        A pickle file (``.bin``) needs ``allow_pickle=True`` (diffusers reads it with weights_only=True)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no LoRA weights at {path}")
        if not allow_pickle and path.is_file() and path.suffix != ".safetensors":
            raise pickle_refused(path)
        if not allow_pickle and path.is_dir() and not any(path.glob("*.safetensors")):
            pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise pickle_refused(pickles[0])
        sd = self.as_diffusers()
        kw = {"weight_name": path.name} if path.is_file() else {}
        name = adapter_name or f"lora{len(getattr(self.unet, 'peft_config', {}) or {})}"
        sd.load_lora_weights(path.parent if path.is_file() else path, adapter_name=name, **kw)
        if scale != 1.0:
            sd.set_adapters([name], adapter_weights=[scale])

    def fuse_lora(self, scale: float = 1.0) -> None:
        """Merge the loaded adapters into the base weights, then drop them: plain modules, no overhead."""
        sd = self.as_diffusers()
        sd.fuse_lora(lora_scale=scale)
        sd.unload_lora_weights()

    def unload_lora_weights(self) -> None:
        """Remove all adapters (unfused), back to the base model."""
        self.as_diffusers().unload_lora_weights()

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> LatentDiffusionPipeline:
        for module in (self.vae, self.text_encoder, self.unet):
            if device is not None:
                module.to(device)
            if dtype is not None:
                module.to(dtype)
            module.eval()
        return self

    # ------------------------------------------------------------------------------ memory and speed
    def set_attention(self, backend: str = "auto") -> str:
        """auto | sdpa | xformers | math for the UNet's attention; returns the one in use."""
        from ldm.diffusion.unet import set_attention_backend

        return set_attention_backend(self.unet, backend, self.device)

    def enable_attention_slicing(self, slice_size: str | int = "auto") -> None:
        """Compute attention in slices of heads: less peak memory, a little slower."""
        self.unet.set_attention_slice(slice_size)

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time."""
        self.vae.enable_slicing()

    def enable_vae_tiling(
        self, tile_size: int | None = None, pad: int | None = None, offload: bool = True
    ) -> None:
        """Decode latents larger than ``tile_size`` pixels in tiles, with GroupNorm statistics of the
        whole image: equal to untiled decoding, without seams (see ``ldm.tiled_decode``).
        ``tile_size`` defaults to the autoencoder's training size or 4 pads, whichever is larger;
        ``pad``: latent pixels of context per tile (default: exact); ``offload``: waiting tiles stay
        on the CPU. Encoding (img2img) is not tiled."""
        from ldm.tiled_decode import default_tile

        if tile_size is not None and (tile_size <= 0 or tile_size % self.vae_scale_factor):
            raise ValueError(
                f"tile_size={tile_size}: give a positive multiple of the VAE factor {self.vae_scale_factor}"
            )
        tile = tile_size // self.vae_scale_factor if tile_size else default_tile(self.vae)
        self._tiling = {"tile": tile, "pad": pad, "offload": offload}

    def disable_vae_tiling(self) -> None:
        self._tiling = None

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
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> z_0 = scaling_factor * mean of q(z | x), (B, C, h, w)."""
        x = images.to(self.device, self.vae.dtype)
        return (self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """z_0 (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1]."""
        z = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        tiling = self._tiling
        if tiling is None or max(z.shape[-2:]) <= tiling["tile"]:
            return self.vae.decode(z).sample.clamp(-1, 1)
        from ldm.tiled_decode import decode_tiled

        parts = z.split(1) if self.vae.use_slicing else [z]
        return torch.cat([decode_tiled(self.vae, p, **tiling) for p in parts]).clamp(-1, 1)

    def _noise(self, shape: tuple[int, ...], seeds: list[int | None]) -> torch.Tensor:
        """One CPU generator per image, so an image depends on its own seed only."""
        noise = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            noise.append(torch.randn(shape, generator=gen))
        return torch.stack(noise).to(self.device, self.dtype)  # (n, C, h, w)

    # ------------------------------------------------------------------------------ sampling
    @torch.inference_mode()
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
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        guidance_rescale: float = 0.0,
        image: ImageInput | list[ImageInput] | None = None,
        strength: float = 0.8,
        mask: ImageInput | list[ImageInput] | None = None,
    ) -> PipelineOutput:
        """Generate images for ``prompt``; see the module docstring for the flow.

        ``seed``: an int (image i gets seed + i) or one int per image; ``generator`` (one, or a list
        with one per image) drives the noise of stochastic samplers (default: one per image, from its seed). ``callback(i, t, latents)``
        runs after each step. ``image`` + ``strength`` in (0, 1]: img2img; with ``mask`` (1 where to
        generate, 0 where to keep ``image``): inpainting.
        """
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        if num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps is {num_inference_steps}; it must be > 0")
        if num_images_per_prompt <= 0:
            raise ValueError(f"num_images_per_prompt is {num_images_per_prompt}; it must be > 0")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type is {output_type!r}; allowed: {' | '.join(OUTPUT_TYPES)}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength is {strength}; it must be in (0, 1]")
        if mask is not None and image is None:
            raise ValueError("mask: inpainting needs the image to keep; pass image= as well")
        n = len(prompts) * num_images_per_prompt
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [p for p in negatives for _ in range(num_images_per_prompt)]
        seeds = _seed_list(seed, n)

        init = None
        if image is not None:
            init = to_image_tensor(image)
            init = init.expand(n, -1, -1, -1) if len(init) == 1 else init
            if len(init) != n:
                raise ValueError(f"image: {len(init)} images for {n} outputs; give one, or one per output")
            height, width = init.shape[-2:]
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default_size, width or default_size
        for name, side in (("height", height), ("width", width)):
            if side % self.vae_scale_factor:
                raise ValueError(
                    f"{name} is {side}; it must be a multiple of the VAE factor {self.vae_scale_factor}"
                )
        latent_shape = (
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )

        scheduler = make_scheduler(sampler, self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        if hasattr(scheduler, "set_begin_index"):  # start at index 0 even if the first timestep repeats
            scheduler.set_begin_index(0)  # (Karras sigmas can round two high sigmas to one timestep)
        guided = guidance_scale > 1.0
        context = self.encode_prompt(negatives + prompts if guided else prompts)  # (2n or n, L, D)
        noise = self._noise(latent_shape, seeds) if latents is None else latents.to(self.device, self.dtype)
        z_known = keep = None
        if init is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            z_known = self.encode_images(init)  # (n, C, h, w)
            if mask is None:  # img2img: skip the first (1 - strength) of the schedule
                # as diffusers counts it: the last int(N * strength) steps run
                start = min(
                    num_inference_steps - int(num_inference_steps * strength), num_inference_steps - 1
                )
                timesteps = timesteps[start * scheduler.order :]
                if hasattr(scheduler, "set_begin_index"):
                    scheduler.set_begin_index(start * scheduler.order)
                latents = scheduler.add_noise(z_known, noise, timesteps[:1].repeat(n))
            else:  # inpainting: generate everywhere, then keep the known region at each step's noise level
                m = to_mask_tensor(mask).to(self.device, self.dtype)  # 1: generate, 0: keep
                keep = 1 - F.interpolate(m, size=latent_shape[1:], mode="bilinear", align_corners=False)
                keep = keep.expand(n, 1, -1, -1) if len(keep) == 1 else keep
                latents = noise * scheduler.init_noise_sigma

        params = set(inspect.signature(scheduler.step).parameters)
        step_kwargs: dict[str, Any] = {"eta": eta} if "eta" in params else {}
        if "generator" in params:
            if (
                generator is None and seeds[0] is not None
            ):  # one per image: its noise depends on its seed only
                generator = [torch.Generator().manual_seed(s + 1_000_003) for s in seeds]
            step_kwargs["generator"] = generator

        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling", leave=False)):
            model_in = torch.cat([latents, latents]) if guided else latents  # (2n, C, h, w): [uncond; cond]
            model_in = scheduler.scale_model_input(model_in, t)
            pred = self.unet(model_in, t, encoder_hidden_states=context).sample
            if guided:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = guided_prediction(pred_uncond, pred_cond, guidance_scale)
                if guidance_rescale > 0:
                    pred = rescale_guidance(pred, pred_cond, guidance_rescale)
            latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
            if keep is not None:
                known = z_known
                if i + 1 < len(timesteps):  # the known region at the next step's noise level
                    known = scheduler.add_noise(z_known, noise, timesteps[i + 1 : i + 2].repeat(n))
                latents = keep * known + (1 - keep) * latents
            if callback is not None:
                callback(i, t, latents)

        if output_type == "latent":
            return PipelineOutput(images=latents)
        images = self.decode_latents(latents).float().cpu()  # (n, 3, H, W) in [-1, 1]
        if output_type == "pt_signed":
            return PipelineOutput(images=images)
        unit = (images / 2 + 0.5).clamp(0, 1)  # (n, 3, H, W) in [0, 1], as diffusers' VaeImageProcessor
        if output_type == "pt":
            return PipelineOutput(images=unit)
        if output_type == "np":
            return PipelineOutput(images=unit.permute(0, 2, 3, 1).numpy())  # (n, H, W, 3) float32
        return PipelineOutput(images=[Image.fromarray(a) for a in to_uint8(images)])


def _prompt_lists(
    prompt: str | list[str], negative_prompt: str | list[str] | None
) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt: the prompt list is empty; give at least one prompt")
    negatives = [""] * len(prompts) if negative_prompt is None else negative_prompt
    negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
    if len(negatives) != len(prompts):
        raise ValueError(
            f"negative_prompt: {len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt"
        )
    return prompts, negatives


def _seed_list(seed: int | list[int] | None, n: int) -> list[int | None]:
    if isinstance(seed, list):
        if len(seed) != n:
            raise ValueError(f"seed: {len(seed)} seeds for {n} images; give one per image or a single int")
        return list(seed)
    return [None] * n if seed is None else [seed + i for i in range(n)]
