"""Conditioning: the Conditioner (captions -> UNet keyword arguments), the CLIP tokenizer, text encoders
(CLIP, OpenCLIP, a small from-scratch CLIP), condition dropout for classifier-free guidance."""

from conditioning.conditioner import Conditioner, Conditioning, build_conditioner
from conditioning.config import TextEncoderConfig
from conditioning.dropout import NULL_CAPTION, apply_uncond, drop_captions, uncond_mask
from conditioning.encoders import TEXT_ENCODERS, TextEncoder, build_text_encoder, drop_last_layer
from conditioning.openclip import convert_open_clip_text
from conditioning.tokenizer import PAD_TOKEN_ID, build_clip_tokenizer, clean_caption

__all__ = [
    "Conditioner",
    "Conditioning",
    "build_conditioner",
    "NULL_CAPTION",
    "PAD_TOKEN_ID",
    "TEXT_ENCODERS",
    "TextEncoder",
    "TextEncoderConfig",
    "apply_uncond",
    "build_clip_tokenizer",
    "build_text_encoder",
    "clean_caption",
    "convert_open_clip_text",
    "drop_captions",
    "drop_last_layer",
    "uncond_mask",
]
