"""The pipeline's inputs: images, masks, prompts and seeds as callers give them, checked and converted."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# As diffusers' pipelines: "pil" images, "np" float32 (n, H, W, 3) and "pt" float32 (n, 3, H, W) in
# [0, 1], "latent" the final latents; and ours, "pt_signed": (n, 3, H, W) in [-1, 1] as the decoder
# gives it (what our grids, metrics and the shapes reader take).
OUTPUT_TYPES = ("pil", "np", "pt", "latent", "pt_signed")
ImageInput = Image.Image | np.ndarray | torch.Tensor


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


def prompt_lists(
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


def seed_list(seed: int | list[int] | None, n: int) -> list[int | None]:
    if isinstance(seed, list):
        if len(seed) != n:
            raise ValueError(f"seed: {len(seed)} seeds for {n} images; give one per image or a single int")
        return list(seed)
    return [None] * n if seed is None else [seed + i for i in range(n)]
