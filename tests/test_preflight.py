"""Fine-tuning notices what the base model cannot do: the autoencoder's PSNR and the text encoder's
unseen words are checked before training, and ``vae=`` next to ``pretrained=`` swaps the autoencoder."""

import json
import logging

import numpy as np
import pytest
import torch
from conftest import tiny_autoencoder
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from test_ldm_train import tiny

from conditioning import build_clip_tokenizer
from conditioning.vocabulary import load_trained_tokens, save_trained_tokens, unseen_token_share
from ldm.core.config import load_config
from ldm.core.errors import ModelError
from ldm.data.export_folder import export_folder
from ldm.train.config import LDMRunConfig
from ldm.train.diffusion import train_ldm

NEW_WORDS = ["dark vertical stripes", "light checkerboard", "dark horizontal stripes", "light plain"]


def test_unseen_token_share_counts_word_tokens_only(tmp_path):
    tokenizer = build_clip_tokenizer(16)
    ids = tokenizer(
        ["a red circle", "a red zebra"], padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    known = set(tokenizer(["a red circle"]).input_ids[0])
    special = tokenizer.all_special_ids
    assert unseen_token_share(ids[:1], special, known) == 0.0
    assert unseen_token_share(ids, special, known) == pytest.approx(1 / 6)  # "zebra" of 6 word tokens
    save_trained_tokens(tmp_path, known)
    assert load_trained_tokens(tmp_path) == known and load_trained_tokens(tmp_path / "none") is None


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny scratch model trained on shapes, exported with the record of its tokens."""
    folder = tmp_path_factory.mktemp("base")
    vae = folder / "vae"
    tiny_autoencoder(scaling_factor=0.8).save_pretrained(vae)
    out = train_ldm(tiny(folder / "run", vae, "train.max_steps=2", "train.checkpoint_every=0",
                         "train.sample_every=0", "eval.num_samples=0"))  # fmt: skip
    return out / "model", vae


def gray_folder(root, captions, n=16):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        gray = rng.integers(0, 255, (16, 16), dtype=np.uint8)
        Image.fromarray(np.stack([gray] * 3, -1)).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": captions[i % len(captions)]}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def finetune(out, model, data, *extra) -> LDMRunConfig:
    return load_config(LDMRunConfig, None, [
        f"output_dir={out}", f"pretrained={model}", "data.dataset=folder", f"data.path={data}",
        "data.resolution=16", "data.val_size=2", "train.batch_size=4", "train.max_steps=1", "train.compile=false",
        "train.sample_every=0", "train.checkpoint_every=0", "train.ema_decay=0", "eval.num_samples=0",
        "sample.steps=2", "sample.grid_prompts=1", "sample.grid_seeds=1", *extra])  # fmt: skip


def preflight_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "preflight" in r.getMessage()
    ]


def test_scratch_export_records_the_tokens_it_trained_on(base):
    model, _ = base
    tokens = load_trained_tokens(model / "text_encoder")
    tokenizer = build_clip_tokenizer(16)
    for word in ("circle", "square", "triangle", "background", "magenta"):
        assert tokenizer.convert_tokens_to_ids(f"{word}</w>") in tokens, word
    assert tokenizer.convert_tokens_to_ids("stripes</w>") not in tokens


def test_new_words_warn_and_known_words_do_not(tmp_path, base, caplog):
    model, _ = base
    caplog.set_level(logging.INFO, logger="ldm")
    shapes = tmp_path / "shapes"
    export_folder(shapes, 16, resolution=16)
    checks = ["preflight.min_psnr=-100"]  # this test is about the words; the tiny autoencoder is untrained
    train_ldm(finetune(tmp_path / "known", model, shapes, *checks))
    assert preflight_warnings(caplog) == []
    caplog.clear()
    new = gray_folder(tmp_path / "new", NEW_WORDS)
    train_ldm(finetune(tmp_path / "frozen", model, new, *checks))  # text encoder frozen
    (warning,) = preflight_warnings(caplog)
    assert (
        "never seen by the text encoder" in warning and "stripes" in warning and "text.train=true" in warning
    )
    caplog.clear()
    out = train_ldm(finetune(tmp_path / "trained", model, new, *checks, "text.train=true", "train.lr=1e-3"))
    assert preflight_warnings(caplog) == []  # trained at a rate that learns new words
    tokens = load_trained_tokens(out / "model" / "text_encoder")  # the old words and the new ones
    tokenizer = build_clip_tokenizer(16)
    assert {tokenizer.convert_tokens_to_ids(w) for w in ("circle</w>", "stripes</w>")} <= tokens


def test_low_reconstruction_psnr_warns_with_the_command_that_fixes_it(tmp_path, base, caplog):
    model, _ = base
    caplog.set_level(logging.INFO, logger="ldm")
    data = gray_folder(tmp_path / "new", ["a red circle on a black background"])
    train_ldm(finetune(tmp_path / "high", model, data, "preflight.min_psnr=100"))
    (warning,) = preflight_warnings(caplog)
    assert (
        "dB PSNR" in warning
        and "configs/vae/decoder-finetune.yaml" in warning
        and f"data.path={data}" in warning
    )
    caplog.clear()
    train_ldm(finetune(tmp_path / "off", model, data, "preflight.samples=0", "preflight.min_psnr=100"))
    assert preflight_warnings(caplog) == []


def test_vae_next_to_pretrained_replaces_the_autoencoder_in_the_export(tmp_path, base):
    model, vae = base
    torch.manual_seed(1)
    other = AutoencoderKL.from_pretrained(vae)
    for p in other.decoder.parameters():  # a "fine-tuned decoder": the encoder is the same
        p.data.add_(0.01 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "ft-vae")
    data = gray_folder(tmp_path / "data", ["a red circle on a black background"])
    out = train_ldm(
        finetune(tmp_path / "swap", model, data, f"vae={tmp_path / 'ft-vae'}", "preflight.samples=0")
    )
    exported = load_file(str(out / "model" / "vae" / "diffusion_pytorch_model.safetensors"))
    swapped = load_file(str(tmp_path / "ft-vae" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(model / "vae" / "diffusion_pytorch_model.safetensors"))
    key = next(k for k in exported if k.startswith("decoder.") and k.endswith("weight"))
    assert torch.equal(exported[key], swapped[key]) and not torch.equal(exported[key], original[key])

    wrong = AutoencoderKL(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=8, norm_num_groups=4)  # fmt: skip
    wrong.save_pretrained(tmp_path / "wrong-vae")
    with pytest.raises(ModelError, match="latent channels"):
        train_ldm(finetune(tmp_path / "bad", model, data, f"vae={tmp_path / 'wrong-vae'}"))
