"""CLIP score (Hessel et al. 2021, in torchmetrics' scale): 100 * max(cos(E_image(x), E_text(c)), 0).

The CLIP model is a local ``transformers`` ``CLIPModel`` folder (config.json and safetensors, e.g.
``openai/clip-vit-large-patch14`` saved with ``save_pretrained``). Images are resized to the
vision tower's input size and normalised with CLIP's mean and std; the tokenizer is the folder's,
else the CLIP BPE vocabulary that open_clip ships (the same ids). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from conditioning import build_clip_tokenizer
from ldm.core.safe_load import check_model_folder, from_pretrained_kwargs

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip_scorer(path: str | Path, allow_pickle: bool = False) -> tuple[CLIPModel, CLIPTokenizer]:
    """(frozen CLIPModel, tokenizer) from a local folder."""
    folder = check_model_folder(path, allow_pickle, "CLIP model")
    model = CLIPModel.from_pretrained(folder, local_files_only=True, **from_pretrained_kwargs(allow_pickle))
    has_tokenizer = (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()
    length = model.config.text_config.max_position_embeddings
    tokenizer = CLIPTokenizer.from_pretrained(folder) if has_tokenizer else build_clip_tokenizer(length)
    return model.eval().requires_grad_(False), tokenizer


@torch.no_grad()
def clip_score(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    images: torch.Tensor,
    captions: list[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """Per-image CLIP score (N,) of ``images`` (N, 3, H, W) in [-1, 1] against their ``captions``."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    size = model.config.vision_config.image_size
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    scores = []
    for start in range(0, len(images), batch_size):
        x = (images[start : start + batch_size].float().clamp(-1, 1) + 1) / 2
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        ids = tokenizer(
            captions[start : start + batch_size],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        )
        image_emb = model.get_image_features(pixel_values=(x - mean) / std)
        text_emb = model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        cos = F.cosine_similarity(_pooled(image_emb), _pooled(text_emb), dim=-1)
        scores.append(100 * cos.clamp_min(0))
    return torch.cat(scores)


def _pooled(features) -> torch.Tensor:
    """transformers 5 may return a model output rather than a tensor from get_*_features."""
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output if getattr(features, "pooler_output", None) is not None else features[0]
