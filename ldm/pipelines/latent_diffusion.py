"""``LatentDiffusionPipeline``: text to image with classifier-free guidance, the public API.

prompts -> conditioning (and that of the negative prompts, "" by default) -> z_T ~ N(0, I) from
seeded generators -> the denoising core (``ldm.pipelines.denoise``) with the chosen sampler ->
D(z_0 / scaling_factor) -> images. The model's objective (``ldm.diffusion.registry``), read from its
scheduler config, says which samplers fit it.

An SDXL model (a second text encoder, ``text_encoder_2``) is conditioned as diffusers'
``StableDiffusionXLPipeline`` conditions it: both encoders' contexts, the pooled embedding and the
micro-conditioning ``original_size`` / ``crops_coords_top_left`` / ``target_size``; without a
negative prompt the unconditional input is zeros (``force_zeros_for_empty_prompt``).

txt2img starts from pure noise; img2img from a noised encoding of ``image`` part-way down the
schedule (``strength``); inpainting (any model) from noise, re-imposing the known region at each
step's noise level (latent blending), so only the region where ``mask`` is 1 is generated.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from conditioning.conditioner import Conditioner, Conditioning, sdxl_conditioner
from conditioning.encoders import TextEncoder
from ldm.core.images import to_uint8
from ldm.core.safe_load import PICKLE_SUFFIXES, check_model_folder, from_pretrained_kwargs, pickle_refused
from ldm.diffusion.objective import Objective
from ldm.diffusion.registry import objective_for
from ldm.models.autoencoder import IdentityAutoencoder, downsampling_factor, is_identity
from ldm.models.classifier import NoiseConditionalClassifier
from ldm.models.lora import is_peft_folder, load_peft_adapters
from ldm.pipelines.classifier_guidance import Labels, make_guide
from ldm.pipelines.denoise import Blend, denoise, initial_sigma, noise_to
from ldm.pipelines.folder import check_pipeline_folder, is_pixel_folder, is_sdxl_folder, pipeline_index
from ldm.pipelines.inputs import (
    OUTPUT_TYPES,
    ImageInput,
    prompt_lists,
    seed_list,
    to_image_tensor,
    to_mask_tensor,
)
from ldm.pipelines.samplers import SAMPLERS, make_scheduler
from ldm.pipelines.single_file import SINGLE_FILE_SUFFIXES, load_single_file, save_single_file

logger = logging.getLogger("ldm")
STEP_SEED_OFFSET = 1_000_003  # a stochastic sampler's generator per image: seed + this


@dataclass
class PipelineOutput:
    images: list[Image.Image] | np.ndarray | torch.Tensor


class LatentDiffusionPipeline:
    """Autoencoder + text encoder(s) + UNet + a noise-schedule config; samplers are chosen per call.

    SDXL: ``text_encoder_2`` (a ``CLIPTextModelWithProjection``) and ``tokenizer_2`` as well.
    """

    def __init__(
        self,
        vae: AutoencoderKL | IdentityAutoencoder,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler_config: dict[str, Any],
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("text_encoder_2 and tokenizer_2 go together (an SDXL pipeline has both)")
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.objective: Objective = objective_for(self.scheduler_config)  # what the UNet was trained with
        self._tiling: dict[str, Any] | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def is_pixel_space(self) -> bool:
        """Whether the model diffuses pixels (``autoencoder.kind=identity``): no autoencoder, f = 1."""
        return is_identity(self.vae)

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def conditioner(self) -> Conditioner:
        """The conditioner over this pipeline's text encoders and tokenizers (a view: no copy, no mode change)."""

        def view(model, tokenizer) -> TextEncoder:
            max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
            return TextEncoder(model, tokenizer, max_length, trainable=False, freeze=False)

        first = view(self.text_encoder, self.tokenizer)
        if not self.is_sdxl:
            return Conditioner([first])
        second = view(self.text_encoder_2, self.tokenizer_2)
        return sdxl_conditioner(first, second, zero_uncond=self.force_zeros_for_empty_prompt)

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
        config: str | Path | None = None,
    ) -> LatentDiffusionPipeline:
        """Load our exported folder or a diffusers Stable Diffusion 1.x/2.x or SDXL folder, or a
        single-file checkpoint (``.safetensors`` in the original layout, through diffusers'
        ``from_single_file``; ``config``: a diffusers folder with its architecture's configs, needed
        offline unless ldm wrote the file, see ``ldm.pipelines.single_file``).

        ``attention``: auto (xformers when installed on CUDA, else PyTorch SDPA) | sdpa | xformers | math.
        ``compile``: ``torch.compile`` the UNet, in place (pays off on GPUs over many calls);
        ``compile_vae``: the VAE decoder too.
        ``channels_last``: UNet and VAE convolutions in NHWC, which oneDNN and cuDNN run faster
        (5% per UNet call on the shapes model on the CPU; same images to float rounding).
        ``vae``: another autoencoder (a folder or a model) with the same latent space, e.g. one
        whose decoder was fine-tuned (``train_vae.py train.decoder_only=true``). A pixel-space folder
        (``"vae": [null, null]`` in its model_index.json, no vae/) gets the identity autoencoder.
        ``allow_pickle``: weights are read from safetensors; a part with only pickle weights
        (``.bin``) raises ``PickleRefusedError`` unless this is True, and is then read with
        ``weights_only=True`` (``ldm.core.safe_load``).
        """
        if Path(path).suffix in SINGLE_FILE_SUFFIXES:
            pipe = cls._from_single_file(path, config, vae, allow_pickle)
        else:
            pipe = cls._from_folder(path, vae, allow_pickle)
        pipe.to(device, dtype)
        if channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        pipe.set_attention(attention)
        if compile:  # in place: the module and its state dict stay as they are
            pipe.unet.compile()
        if compile_vae and not pipe.is_pixel_space:
            pipe.vae.decoder.compile()
        return pipe

    @classmethod
    def _from_single_file(cls, path, config, vae, allow_pickle: bool) -> LatentDiffusionPipeline:
        sd = load_single_file(path, config)
        if isinstance(vae, (str, Path)):
            check_model_folder(vae, allow_pickle, "vae")
            vae = AutoencoderKL.from_pretrained(vae, **from_pretrained_kwargs(allow_pickle))
        second = {}
        if hasattr(sd, "text_encoder_2"):
            second = {
                "text_encoder_2": sd.text_encoder_2,
                "tokenizer_2": sd.tokenizer_2,
                "force_zeros_for_empty_prompt": sd.config.get("force_zeros_for_empty_prompt", True),
            }
        return cls(
            vae=vae if vae is not None else sd.vae,
            text_encoder=sd.text_encoder,
            tokenizer=sd.tokenizer,
            unet=sd.unet,
            scheduler_config=dict(sd.scheduler.config),
            **second,
        )

    @classmethod
    def _from_folder(cls, path, vae, allow_pickle: bool) -> LatentDiffusionPipeline:
        from diffusers import DDPMScheduler

        root = check_pipeline_folder(path)
        sdxl = is_sdxl_folder(root)
        if is_pixel_folder(root) and vae is not None:
            raise ValueError(f"{root} is a pixel-space model (no vae/): it takes no vae=")
        vae_dir = Path(vae) if isinstance(vae, (str, Path)) else root / "vae"
        parts = {"unet": root / "unet", "text_encoder": root / "text_encoder"}
        if sdxl:
            parts["text_encoder_2"] = root / "text_encoder_2"
        given = isinstance(vae, AutoencoderKL) or is_pixel_folder(root)
        checks = parts if given else {"vae": vae_dir, **parts}
        for what, folder in checks.items():
            check_model_folder(folder, allow_pickle, what)
        kw = from_pretrained_kwargs(allow_pickle)
        unet = UNet2DConditionModel.from_pretrained(parts["unet"], **kw)
        if is_pixel_folder(root):
            vae = IdentityAutoencoder(unet.config.in_channels, unet.config.sample_size)
        elif not isinstance(vae, AutoencoderKL):
            vae = AutoencoderKL.from_pretrained(vae_dir, **kw)
        second = {}
        if sdxl:
            second = {
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(parts["text_encoder_2"], **kw),
                "tokenizer_2": CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
                "force_zeros_for_empty_prompt": pipeline_index(root).get(
                    "force_zeros_for_empty_prompt", True
                ),
            }
        return cls(
            vae=vae,
            text_encoder=CLIPTextModel.from_pretrained(parts["text_encoder"], **kw),
            tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
            unet=unet,
            scheduler_config=DDPMScheduler.load_config(root / "scheduler"),
            **second,
        )

    def save_pretrained(self, path: str | Path) -> Path:
        """Save as a diffusers ``StableDiffusionPipeline`` (SDXL: ``StableDiffusionXLPipeline``) folder
        (safetensors), atomically; a pixel-space model without vae/ (``"vae": [null, null]``)."""
        import shutil

        from ldm.core.io import replace_dir, umask_permissions

        folder = Path(path)
        sd = self.as_diffusers()
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        sd.save_pretrained(tmp, safe_serialization=True)
        umask_permissions(tmp)  # safetensors writes 0600
        replace_dir(tmp, folder)
        return folder

    def save_single_file(self, path: str | Path, dtype: str = "fp32") -> Path:
        """Save as one ``.safetensors`` in the original Stable Diffusion layout (what ComfyUI,
        AUTOMATIC1111 and ``from_single_file`` read), weights in ``dtype`` (fp32 | fp16 | bf16)."""
        if self.is_pixel_space:
            raise ValueError(
                "a pixel-space model has no VAE, which the single-file layout holds: use save_pretrained"
            )
        return save_single_file(self, path, dtype)

    def as_diffusers(self):
        """A diffusers ``StableDiffusionPipeline`` (SDXL: ``StableDiffusionXLPipeline``) sharing these
        modules (no copies): diffusers' own code for what it already does well (LoRA loading and
        fusing, saving). A pixel-space model's has ``vae=None``: diffusers then returns its images
        with ``output_type="latent"`` (in [-1, 1]; give ``height`` and ``width``, its default factor is 8)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        vae = None if self.is_pixel_space else self.vae
        if self.is_sdxl:
            return StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=getattr(self.unet, "_orig_mod", self.unet),
                scheduler=self.make_scheduler(),
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                add_watermarker=False,
            )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=getattr(self.unet, "_orig_mod", self.unet),  # unwrap torch.compile
            # the objective's default sampler on the same schedule (DDIM, clip_sample off; flow: Euler)
            scheduler=self.make_scheduler(),
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
        ``train_ldm.py lora.rank=R``, or any SD 1.x/2.x or SDXL LoRA) to the UNet and text encoder(s), at ``scale``.
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
        name = adapter_name or f"lora{len(getattr(self.unet, 'peft_config', {}) or {})}"
        if is_peft_folder(path):  # LoHa / LoKr in peft's layout (lora.kind=loha|lokr)
            parts = {
                "unet": self.unet,
                "text_encoder": self.text_encoder,
                "text_encoder_2": self.text_encoder_2,
            }
            load_peft_adapters(path, parts, name, scale)
            return
        sd = self.as_diffusers()
        kw = {"weight_name": path.name} if path.is_file() else {}
        sd.load_lora_weights(path.parent if path.is_file() else path, adapter_name=name, **kw)
        if scale != 1.0:
            sd.set_adapters([name], adapter_weights=[scale])

    def fuse_lora(self, scale: float = 1.0) -> None:  # (LoRA, DoRA, LoHa, LoKr: peft's merge)
        """Merge the loaded adapters into the base weights, then drop them: plain modules, no overhead."""
        sd = self.as_diffusers()
        sd.fuse_lora(lora_scale=scale)
        sd.unload_lora_weights()

    def unload_lora_weights(self) -> None:
        """Remove all adapters (unfused), back to the base model."""
        self.as_diffusers().unload_lora_weights()

    # ------------------------------------------------------------------------------ textual inversion
    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> list[str]:
        """Add the new tokens of a textual-inversion file (or of a folder's ``*.safetensors``) to the
        tokenizer(s) and text encoder(s), through diffusers' ``load_textual_inversion``; returns the
        tokens. Files: diffusers' ``{token: (k, D)}``
        (ours from ``ti.tokens``, SD 1.x/2.x), AUTOMATIC1111's ``string_to_param``, and SDXL's
        ``{"clip_l": (k, 768), "clip_g": (k, 1280)}`` (token: ``token``, else the file's ``token``
        metadata, else its name). Prompts then use it as a word; a k-vector token stands for its k rows."""
        from ldm.pipelines.textual_inversion import load_textual_inversion

        return load_textual_inversion(self, Path(path), token)

    def save_textual_inversion(self, folder: str | Path, tokens: list[str]) -> list[Path]:
        """Write each of ``tokens`` (added by training or loading) to ``folder/<name>.safetensors``, in the
        layout ``load_textual_inversion`` (ours and diffusers') reads; returns the files."""
        from ldm.pipelines.textual_inversion import save_textual_inversion

        return save_textual_inversion(self, Path(folder), tokens)

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> LatentDiffusionPipeline:
        for module in (self.vae, *self.text_encoders, self.unet):
            if device is not None:
                module.to(device)
            if dtype is not None:
                module.to(dtype)
            module.eval()
        return self

    # ------------------------------------------------------------------------------ memory and speed
    def set_attention(self, backend: str = "auto") -> str:
        """auto | sdpa | xformers | math for the UNet's attention; returns the one in use."""
        from ldm.models.unet import set_attention_backend

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
        whole image: equal to untiled decoding, without seams (see ``ldm.pipelines.tiled_decode``).
        ``tile_size`` defaults to the autoencoder's training size or 4 pads, whichever is larger;
        ``pad``: latent pixels of context per tile (default: exact); ``offload``: waiting tiles stay
        on the CPU. Encoding (img2img) is not tiled."""
        from ldm.pipelines.tiled_decode import default_tile

        if self.is_pixel_space:  # nothing to decode: the samples are the images
            logger.info("a pixel-space model decodes nothing: VAE tiling is not needed")
            return

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
        return downsampling_factor(self.vae)

    # ------------------------------------------------------------------------------ pieces
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """Prompts -> conditioning ({"encoder_hidden_states": (B, L, D)}, SDXL: and "text_embeds"
        (B, P)) in the UNet's dtype."""
        return Conditioner.cast(self.conditioner.encode(prompts), self.dtype)

    def _conditioning(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        guided: bool,
        size: tuple[int, int],
        micro: dict[str, Any],
    ) -> Conditioning:
        """[negatives; prompts] (or prompts alone without guidance) with SDXL's time ids. ``negatives``
        None: the empty prompt, or zeros where the model says so (``force_zeros_for_empty_prompt``)."""
        conditioner = self.conditioner
        if not guided:
            cond = self.encode_prompt(prompts)
            return conditioner.with_micro(cond, *self._micro_args(micro, size, negative=False))
        if negatives is None and conditioner.zero_uncond:
            positive = self.encode_prompt(prompts)
            negative = {k: torch.zeros_like(v) for k, v in positive.items()}
        else:
            both = self.encode_prompt((negatives or [""] * len(prompts)) + prompts)
            negative = {k: v[: len(prompts)] for k, v in both.items()}
            positive = {k: v[len(prompts) :] for k, v in both.items()}
        negative = conditioner.with_micro(negative, *self._micro_args(micro, size, negative=True))
        positive = conditioner.with_micro(positive, *self._micro_args(micro, size, negative=False))
        return {k: torch.cat([negative[k], positive[k]]) for k in positive}

    @staticmethod
    def _micro_args(micro: dict[str, Any], size: tuple[int, int], negative: bool) -> tuple:
        """(original_size, crops_coords_top_left, target_size) as diffusers' SDXL pipeline defaults
        them: (height, width), (0, 0), (height, width); the negative ones only when both sizes are given."""
        if (
            negative
            and micro["negative_original_size"] is not None
            and micro["negative_target_size"] is not None
        ):
            keys = ("negative_original_size", "negative_crops_coords_top_left", "negative_target_size")
        else:
            keys = ("original_size", "crops_coords_top_left", "target_size")
        original, crop, target = (micro[k] for k in keys)
        return tuple(torch.tensor(v) for v in (original or size, crop, target or size))

    def make_scheduler(self, sampler: str | None = None) -> SchedulerMixin:
        """The sampler ``sampler`` (default: the objective's) on this model's noise schedule."""
        return make_scheduler(
            sampler or self.objective.default_sampler, self.scheduler_config, self.objective.name
        )

    @contextmanager
    def _vae_precision(self):
        """The autoencoder in float32 for the duration when it is float16 and its config says
        ``force_upcast`` (SDXL's overflows in float16), as diffusers' SDXL pipelines do (its SD
        pipelines do not)."""
        dtype = self.vae.dtype
        upcast = self.is_sdxl and dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            self.vae.to(torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> z_0 = scaling_factor * mean of q(z | x), (B, C, h, w)."""
        with self._vae_precision():
            x = images.to(self.device, self.vae.dtype)
            z = self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor
        return z.to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """z_0 (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1]."""
        with self._vae_precision():
            z = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
            tiling = None if self.is_pixel_space else self._tiling  # (pixels: nothing to decode)
            if tiling is None or max(z.shape[-2:]) <= tiling["tile"]:
                return self.vae.decode(z).sample.clamp(-1, 1)
            from ldm.pipelines.tiled_decode import decode_tiled

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
        sampler: str | None = None,
        eta: float = 0.0,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
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
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        classifier: NoiseConditionalClassifier | str | Path | None = None,
        class_labels: Labels = None,
        classifier_scale: float = 1.0,
    ) -> PipelineOutput:
        """Generate images for ``prompt``; see the module docstring for the flow.

        ``sampler``: a name of ``SAMPLERS`` for this model's objective (default: DDIM for DDPM models,
        flow-euler for rectified-flow ones). ``seed``: an int (image i gets seed + i) or one int per
        image; ``generator`` (one, or a list with one per image) drives the noise of stochastic
        samplers (default: one per image, from its seed). ``callback(i, t, latents)`` runs after each
        step. ``image`` + ``strength`` in (0, 1]: img2img; with ``mask`` (1 where to generate, 0 where
        to keep ``image``): inpainting.

        SDXL models take diffusers' micro-conditioning arguments, each (height, width) or (top, left)
        in pixels: ``original_size`` and ``target_size`` (default: the output size),
        ``crops_coords_top_left`` (default (0, 0)), and their ``negative_`` counterparts for the
        unconditional input (used when both negative sizes are given). Other models ignore them.

        Classifier guidance (Dhariwal & Nichol 2021; DDPM models): ``classifier`` (a
        ``NoiseConditionalClassifier`` or its folder, from ``train_classifier.py``) adds
        ``classifier_scale`` x grad log p(y | z_t) to the score, toward ``class_labels`` ({head: class}
        for every image, or one dict per image; None: the class words of each prompt). With
        ``guidance_scale`` > 1 it guides the classifier-free-guided prediction; with the empty prompt
        and ``guidance_scale=1`` it guides the model's unconditional prediction alone.
        """
        micro = {
            "original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
            "target_size": target_size, "negative_original_size": negative_original_size,
            "negative_crops_coords_top_left": negative_crops_coords_top_left,
            "negative_target_size": negative_target_size,
        }  # fmt: skip
        prompts, negatives = prompt_lists(prompt, negative_prompt)
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
        seeds = seed_list(seed, n)
        init = self._init_images(image, n)
        if init is not None:
            height, width = init.shape[-2:]
        latent_shape = self._latent_shape(height, width)

        scheduler = self.make_scheduler(sampler)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        if hasattr(scheduler, "set_begin_index"):  # start at index 0 even if the first timestep repeats
            scheduler.set_begin_index(0)  # (Karras sigmas can round two high sigmas to one timestep)
        guided = guidance_scale > 1.0
        size = (latent_shape[1] * self.vae_scale_factor, latent_shape[2] * self.vae_scale_factor)
        given_negatives = negatives if negative_prompt is not None else None
        cond = self._conditioning(prompts, given_negatives, guided, size, micro)  # 2n or n rows
        noise = self._noise(latent_shape, seeds) if latents is None else latents.to(self.device, self.dtype)

        blend = None
        if init is None:  # txt2img
            latents = noise * initial_sigma(scheduler)
        elif mask is None:  # img2img
            timesteps, latents = self._img2img_start(scheduler, init, noise, num_inference_steps, strength)
        else:  # inpainting
            blend = self._inpaint_blend(init, mask, noise, latent_shape)
            latents = noise * initial_sigma(scheduler)
        guide = None
        if classifier is not None:
            guide = make_guide(
                classifier, class_labels, prompts, classifier_scale, self.objective, self.device,
                self.unet.config.in_channels,
            )  # fmt: skip
        latents = denoise(
            self.unet, scheduler, latents, timesteps, cond, guidance_scale, guidance_rescale,
            self._step_kwargs(scheduler, eta, generator, seeds), blend, callback, progress, guide,
        )  # fmt: skip
        return self._output(latents, output_type)

    def img2img(
        self, prompt: str | list[str], image: ImageInput | list[ImageInput], strength: float = 0.8, **kwargs
    ) -> PipelineOutput:
        """``__call__`` from ``image`` noised to ``strength`` of the schedule (diffusers' img2img)."""
        return self(prompt, image=image, strength=strength, **kwargs)

    def inpaint(
        self,
        prompt: str | list[str],
        image: ImageInput | list[ImageInput],
        mask: ImageInput | list[ImageInput],
        **kwargs,
    ) -> PipelineOutput:
        """``__call__`` generating only where ``mask`` is 1, keeping ``image`` elsewhere."""
        return self(prompt, image=image, mask=mask, **kwargs)

    # ------------------------------------------------------------------------------ the entry points' parts
    def _init_images(self, image: ImageInput | list[ImageInput] | None, n: int) -> torch.Tensor | None:
        if image is None:
            return None
        init = to_image_tensor(image)
        init = init.expand(n, -1, -1, -1) if len(init) == 1 else init
        if len(init) != n:
            raise ValueError(f"image: {len(init)} images for {n} outputs; give one, or one per output")
        return init

    def _latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default_size, width or default_size
        for name, side in (("height", height), ("width", width)):
            if side % self.vae_scale_factor:
                raise ValueError(
                    f"{name} is {side}; it must be a multiple of the VAE factor {self.vae_scale_factor}"
                )
        return self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def _img2img_start(
        self, scheduler: SchedulerMixin, init: torch.Tensor, noise: torch.Tensor, steps: int, strength: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the timesteps left, z at the first of them): as diffusers counts it, the last
        int(steps * strength) steps run."""
        start = min(steps - int(steps * strength), steps - 1)
        timesteps = scheduler.timesteps[start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        z_known = self.encode_images(init)  # (n, C, h, w)
        return timesteps, noise_to(scheduler, z_known, noise, timesteps[:1].repeat(len(init)))

    def _inpaint_blend(
        self,
        init: torch.Tensor,
        mask: ImageInput | list[ImageInput],
        noise: torch.Tensor,
        latent_shape: tuple,
    ) -> Blend:
        z_known = self.encode_images(init)  # (n, C, h, w)
        m = to_mask_tensor(mask).to(self.device, self.dtype)  # 1: generate, 0: keep
        keep = 1 - F.interpolate(m, size=latent_shape[1:], mode="bilinear", align_corners=False)
        keep = keep.expand(len(init), 1, -1, -1) if len(keep) == 1 else keep
        return Blend(z_known, noise, keep)

    @staticmethod
    def _step_kwargs(
        scheduler: SchedulerMixin, eta: float, generator, seeds: list[int | None]
    ) -> dict[str, Any]:
        params = set(inspect.signature(scheduler.step).parameters)
        step_kwargs: dict[str, Any] = {"eta": eta} if "eta" in params else {}
        if "generator" in params:
            if (
                generator is None and seeds[0] is not None
            ):  # one per image: its noise depends on its seed only
                generator = [torch.Generator().manual_seed(s + STEP_SEED_OFFSET) for s in seeds]
            step_kwargs["generator"] = generator
        return step_kwargs

    def _output(self, latents: torch.Tensor, output_type: str) -> PipelineOutput:
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


__all__ = ["SAMPLERS", "LatentDiffusionPipeline", "PipelineOutput", "check_pipeline_folder"]
