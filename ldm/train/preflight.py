"""Checks, in seconds and before training, that the base model can learn the user's data at all.

A fine-tune on a new domain fails without a word when the frozen parts cannot carry it:

- the autoencoder cannot reproduce the images (a model trained on flat-coloured shapes decodes a
  photograph in saturated colours): whatever the UNet learns, the decoder draws something else.
  Measured as the reconstruction PSNR of a sample of the training images through the posterior
  mean; the cure is fine-tuning the decoder (``configs/vae/decoder-finetune.yaml``), then ``vae=``.
- the text encoder has never seen the caption's words (our scratch encoders learn only the words
  of their training captions, recorded in ``text_encoder/trained_tokens.json``): a frozen encoder,
  or one trained at Stable Diffusion's lr, then gives every new caption nearly the same context
  and guidance changes nothing. Measured as the share of the sample's word tokens that are not in
  the record; the cure is training the text encoder at a higher lr (``configs/ldm/finetune-scratch.yaml``).

Each finding is one warning that says what was measured and what to run.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.data import Dataset, IterableDataset

from conditioning import TextEncoder
from conditioning.vocabulary import caption_token_ids, unseen_token_share
from ldm.eval.quality import psnr

logger = logging.getLogger("ldm")

# A text encoder that trains at this lr or more learns new words within a fine-tune's steps (measured
# on the shapes demo model: 1e-3 learns them, Stable Diffusion's 1e-4 leaves guidance without effect).
NEW_WORDS_MIN_LR = 1e-3


@dataclass
class Findings:
    psnr: float | None = None  # dB, mean over the sample
    unseen_tokens: float | None = None  # share of the sample's word tokens the text encoder never saw
    unseen_examples: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def sample_items(dataset: Dataset | IterableDataset, n: int) -> list[dict]:
    """``n`` items (unaugmented): the first of a stream; of a map-style dataset, spread evenly over
    its distinct items (under ``data.repeats`` or a concept dataset's positions, every source's)."""
    if isinstance(dataset, IterableDataset):
        return list(itertools.islice(iter(dataset), n))
    dataset = getattr(dataset, "base", dataset)  # (RepeatedDataset, SourceView: the distinct items)
    count = min(n, len(dataset))
    return [dataset[i * len(dataset) // count] for i in range(count)]


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, items: list[dict]) -> float:
    """Mean PSNR (dB) of x against D(mean of q(z | x)) over ``items``, grouped by image shape."""
    device = vae.device
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for it in items:
        groups.setdefault(tuple(it["pixel_values"].shape), []).append(it["pixel_values"])
    values = []
    for images in groups.values():
        for chunk in torch.stack(images).split(16):
            x = chunk.to(device, vae.dtype)  # (b, 3, H, W) in [-1, 1]
            x_rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            values.append(psnr(x_rec.float().cpu(), x.float().cpu()))
    return float(torch.cat(values).mean())


def check_base_model(
    items: list[dict],
    vae: AutoencoderKL,
    vae_dir: str | Path,
    text_encoder: TextEncoder,
    trained_tokens: set[int] | None,
    text_lr: float | None,
    min_psnr: float,
    max_unseen_tokens: float,
    data_path: str | None,
) -> Findings:
    """Measure both checks on ``items`` and warn where one fails. ``trained_tokens``: the record of
    the text encoder (None for pretrained encoders, which saw the whole vocabulary); ``text_lr``:
    the lr the text encoder trains at, None when it is frozen."""
    if not items:
        return Findings()
    warnings = []
    value = reconstruction_psnr(vae, items)
    if value < min_psnr:
        warnings.append(
            f"the autoencoder at {vae_dir} reconstructs {len(items)} of your training images at {value:.1f} dB "
            f"PSNR (below preflight.min_psnr={min_psnr:g}): it cannot draw this data, whatever the UNet learns. "
            "Fine-tune its decoder first (the latents stay valid), then train with it: python train_vae.py "
            f"--config configs/vae/decoder-finetune.yaml pretrained={vae_dir} data.path={data_path or 'DIR'} "
            "output_dir=runs/my-vae, then add vae=runs/my-vae/model here"
        )
    share, examples = None, ()
    if trained_tokens is not None:
        tokenizer = text_encoder.tokenizer
        ids = text_encoder.tokenize([str(it["caption"] or "") for it in items])  # (n, L)
        special = tokenizer.all_special_ids
        share = unseen_token_share(ids, special, trained_tokens)
        words = caption_token_ids(ids, special).unique().tolist()
        unseen = [
            tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in words if i not in trained_tokens
        ]
        examples = tuple(unseen[:8])
        if share > max_unseen_tokens and (text_lr is None or text_lr < NEW_WORDS_MIN_LR):
            state = "frozen" if text_lr is None else f"trained at lr {text_lr:g}"
            warnings.append(
                f"{share:.0%} of the word tokens of {len(items)} of your captions were never seen by the text "
                f"encoder in training (e.g. {', '.join(examples)}); it is {state}, so the model will learn to "
                "ignore these captions (guidance then changes nothing). Train the text encoder at a higher lr: "
                f"text.train=true train.lr={NEW_WORDS_MIN_LR:g} (configs/ldm/finetune-scratch.yaml does this)"
            )
    for message in warnings:
        logger.warning("preflight: %s", message)
    if not warnings:
        logger.info(
            "preflight: autoencoder %.1f dB on %d training images%s", value, len(items),
            "" if share is None else f"; {share:.0%} of caption tokens new to the text encoder",
        )  # fmt: skip
    return Findings(value, share, examples, tuple(warnings))


def preflight(
    cfg, train_set, vae: AutoencoderKL, vae_dir: Path, conditioner, trained_tokens: set[int] | None
) -> Findings:
    """``check_base_model`` for a run: ``preflight.samples`` of its training items, the lr its text
    encoder trains at (None when it stays frozen)."""
    p = cfg.preflight
    if p.samples <= 0:
        return Findings()
    text_lr = cfg.train.lr if conditioner.trainable or (cfg.lora.rank and cfg.lora.text_encoder) else None
    return check_base_model(
        sample_items(train_set, p.samples), vae, vae_dir, conditioner.encoders[0], trained_tokens, text_lr,
        p.min_psnr, p.max_unseen_tokens, cfg.data.path,
    )  # fmt: skip
