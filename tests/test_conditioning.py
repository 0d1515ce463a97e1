"""Text conditioning: tokenizer parity with OpenCLIP, encoders (scratch, clip, openclip), condition dropout."""

import json
import math

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conditioning import (
    PAD_TOKEN_ID,
    TextEncoderConfig,
    apply_uncond,
    build_clip_tokenizer,
    build_text_encoder,
    clean_caption,
    drop_captions,
    uncond_mask,
)
from ldm.core.config import ConfigError, load_config

CAPTIONS = [
    "a red circle on a black background",
    "a cyan triangle on a white background",
    "",
    "Hello, World!!  It's  ME",
    "wow! great!? (yes) -- 3.14, 1234567",
    "don't WON'T they're",
    "café naïve 日本語 🙂 🏳️\u200d🌈",
    "tabs\tnew\nlines\u00a0nbsp\u3000ideographic",
    "! !! !!!",
]
NEEDS_CLEANING = [  # HF's tokenizer alone differs from OpenCLIP on these; clean_caption closes the gap
    "a &amp; b &amp;amp; c",
    "“curly” ‘quotes’",
    "ﬁne ｗｉｄｅ",
    "mojibake cafÃ©",
    "ΟΔΟΣ",
    "control\x1cchar",
]
LONG = "a red circle on a black background, " * 20  # far more than 77 tokens
MAX_LENGTH = 77


def hf_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer(MAX_LENGTH)


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_equals_open_clip(tokenizer):
    assert tokenizer.pad_token_id == PAD_TOKEN_ID == 0
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (49406, 49407, 49408)
    assert torch.equal(hf_ids(tokenizer, CAPTIONS), open_clip.tokenize(CAPTIONS))
    cleaned = [clean_caption(c) for c in CAPTIONS + NEEDS_CLEANING]
    assert torch.equal(hf_ids(tokenizer, cleaned), open_clip.tokenize(CAPTIONS + NEEDS_CLEANING))


def test_cleaning_is_what_differs(tokenizer):
    raw = hf_ids(tokenizer, NEEDS_CLEANING)
    assert not (raw == open_clip.tokenize(NEEDS_CLEANING)).all(dim=1).any()


def test_exclamation_mark_is_text_not_padding(tokenizer):
    """The pad token "!" must not be split out of captions (diffusers #4153)."""
    ids = hf_ids(tokenizer, ["wow!!"])[0].tolist()
    assert ids[:4] == [49406, *tokenizer.convert_tokens_to_ids(["wow</w>", "!!</w>"]), 49407]


def test_truncation_matches_open_clip(tokenizer):
    ids = hf_ids(tokenizer, [LONG])
    expected = open_clip.tokenize([LONG])
    assert torch.equal(ids, expected)
    assert ids.shape == (1, MAX_LENGTH) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert (ids[0, 1:-1] != 0).all()  # no padding in a truncated caption


def test_literal_open_clip_special_strings_are_plain_text(tokenizer):
    """Documented difference: OpenCLIP maps the literal "<end_of_text>" to its end token; we keep it text."""
    ids = hf_ids(tokenizer, ["a <end_of_text> b"])[0]
    assert (ids == 49407).sum() == 1
    assert (open_clip.tokenize(["a <end_of_text> b"])[0] == 49407).sum() == 2


def test_tokenizer_save_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "!" and config["split_special_tokens"] is True
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert reloaded.model_max_length == MAX_LENGTH
    captions = CAPTIONS + [LONG]
    assert torch.equal(hf_ids(reloaded, captions), open_clip.tokenize(captions))


# --- encoders ----------------------------------------------------------------------------------------


def test_scratch_encoder_shape_and_gradients():
    torch.manual_seed(0)
    encoder = build_text_encoder(TextEncoderConfig())
    model_cfg = encoder.model.config
    assert (model_cfg.pad_token_id, model_cfg.bos_token_id, model_cfg.eos_token_id) == (0, 49406, 49407)
    assert model_cfg.hidden_act == "quick_gelu" and model_cfg.max_position_embeddings == MAX_LENGTH
    assert encoder.trainable and encoder.model.training and encoder.hidden_size == 128
    context = encoder.encode(CAPTIONS[:3])
    assert context.shape == (3, MAX_LENGTH, 128)
    context.pow(2).mean().backward()
    grads = [p.grad for p in encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def tiny_clip_text_model(layers: int = 3) -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        pad_token_id=0,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, tokenizer):
    """A CLIPTextModel folder with its tokenizer files next to the weights."""
    folder = tmp_path_factory.mktemp("clip")
    tiny_clip_text_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_clip_folder_loads_frozen_and_saves(clip_folder, tmp_path):
    encoder = build_text_encoder(TextEncoderConfig(kind="clip", name_or_path=str(clip_folder)))
    assert not encoder.trainable
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training  # a frozen encoder stays in eval mode
    ids = encoder.tokenize(CAPTIONS)
    assert torch.equal(ids, open_clip.tokenize(CAPTIONS))
    context = encoder(ids)
    assert context.shape == (len(CAPTIONS), MAX_LENGTH, 32) and not context.requires_grad
    reference = CLIPTextModel.from_pretrained(clip_folder)(ids).last_hidden_state
    torch.testing.assert_close(context, reference, rtol=0, atol=0)

    encoder.save(tmp_path)
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()
    reloaded = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")(ids).last_hidden_state
    torch.testing.assert_close(reloaded, context, rtol=0, atol=0)
    assert torch.equal(hf_ids(CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"), CAPTIONS), ids)

    # the saved folder has a pipeline's layout (text_encoder/, tokenizer/) and loads back as such
    again = build_text_encoder(TextEncoderConfig(kind="clip", name_or_path=str(tmp_path), train=True))
    assert again.trainable and all(p.requires_grad for p in again.parameters())
    torch.testing.assert_close(again(ids), context, rtol=0, atol=0)


def test_penultimate_is_clip_skip_1(clip_folder):
    """SD 2 context: final_layer_norm(hidden_states[-2]) of the full model (diffusers' clip_skip=1)."""
    cfg = TextEncoderConfig(kind="clip", name_or_path=str(clip_folder), layer="penultimate")
    encoder = build_text_encoder(cfg)
    assert encoder.model.config.num_hidden_layers == 2
    full = CLIPTextModel.from_pretrained(clip_folder)
    ids = encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        hidden = full(ids, output_hidden_states=True).hidden_states[-2]
        expected = full.final_layer_norm(hidden)
    torch.testing.assert_close(encoder(ids), expected, rtol=1e-5, atol=1e-5)


def test_clip_errors_say_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_text_encoder(TextEncoderConfig(kind="clip", name_or_path=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match=r"text_encoder/\{config.json"):
        build_text_encoder(TextEncoderConfig(kind="clip", name_or_path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="hub id"):
        build_text_encoder(TextEncoderConfig(kind="clip", name_or_path="no-such-org/no-such-clip-model"))


def test_clip_folder_without_tokenizer_falls_back(tmp_path):
    tiny_clip_text_model(layers=1).save_pretrained(tmp_path)
    encoder = build_text_encoder(TextEncoderConfig(kind="clip", name_or_path=str(tmp_path)))
    assert encoder.tokenizer.pad_token_id == 0
    assert torch.equal(encoder.tokenize(CAPTIONS), open_clip.tokenize(CAPTIONS))


TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": MAX_LENGTH, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module", params=[False, True], ids=["gelu", "quick_gelu"])
def open_clip_weights(request, tmp_path_factory):
    """A tiny OpenCLIP model registered under a new name, its weights saved as safetensors."""
    folder = tmp_path_factory.mktemp("openclip")
    name = f"ldm-test-tiny-{'quickgelu' if request.param else 'gelu'}"
    (folder / f"{name}.json").write_text(json.dumps({**TINY_OPEN_CLIP, "quick_gelu": request.param}))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(2)
    model = open_clip.create_model(name)
    for (
        p
    ) in model.parameters():  # LayerNorms start at (1, 0) and biases at 0: randomize so the test sees them
        p.data.add_(0.05 * torch.randn_like(p))
    weights = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return name, str(weights)


def open_clip_token_states(
    model: torch.nn.Module, ids: torch.Tensor, drop_last: bool = False
) -> torch.Tensor:
    """OpenCLIP's encode_text up to ln_final (before pooling and text_projection); drop_last as SD 2 does."""
    x = model.token_embedding(ids) + model.positional_embedding  # (B, L, D)
    if drop_last:
        for block in model.transformer.resblocks[:-1]:
            x = block(x, attn_mask=model.attn_mask)
    else:
        x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)  # (B, L, D)


def test_openclip_converts_exactly(open_clip_weights):
    name, weights = open_clip_weights
    reference = open_clip.create_model(name, pretrained=weights).eval()
    encoder = build_text_encoder(TextEncoderConfig(kind="openclip", name_or_path=name, pretrained=weights))
    quick = "quick" in name
    assert encoder.model.config.hidden_act == ("quick_gelu" if quick else "gelu")
    assert not encoder.trainable
    ids = encoder.tokenize(CAPTIONS + [LONG])
    assert torch.equal(ids, open_clip.tokenize(CAPTIONS + [LONG]))
    context = encoder(ids)
    with torch.no_grad():
        expected = open_clip_token_states(reference, ids)
        pooled = context[torch.arange(len(ids)), ids.argmax(dim=-1)] @ reference.text_projection
        encoded = reference.encode_text(ids)
    torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, encoded, rtol=1e-5, atol=1e-5)

    penultimate = build_text_encoder(
        TextEncoderConfig(kind="openclip", name_or_path=name, pretrained=weights, layer="penultimate")
    )
    with torch.no_grad():
        expected = open_clip_token_states(reference, ids, drop_last=True)
    torch.testing.assert_close(penultimate(ids), expected, rtol=1e-5, atol=1e-5)


# --- condition dropout -------------------------------------------------------------------------------


def test_drop_captions_rate_and_reproducibility():
    n, p = 20_000, 0.1
    captions = [f"caption {i}" for i in range(n)]
    dropped = drop_captions(captions, p, torch.Generator().manual_seed(0))
    count = sum(c == "" for c in dropped)
    assert abs(count - n * p) < 3 * math.sqrt(n * p * (1 - p))
    assert all(d in ("", c) for c, d in zip(captions, dropped, strict=True))
    assert dropped == drop_captions(captions, p, torch.Generator().manual_seed(0))
    assert dropped != drop_captions(captions, p, torch.Generator().manual_seed(1))
    assert drop_captions(captions[:100], 0.0, torch.Generator().manual_seed(0)) == captions[:100]
    with pytest.raises(ValueError):
        drop_captions(captions, 1.0, torch.Generator())


def test_uncond_mask_and_apply():
    mask = uncond_mask(8, 0.5, torch.Generator().manual_seed(3))
    assert mask.shape == (8,) and mask.dtype == torch.bool
    assert torch.equal(mask, uncond_mask(8, 0.5, torch.Generator().manual_seed(3)))
    context, uncond = torch.randn(8, 5, 4), torch.zeros(1, 5, 4)
    mixed = apply_uncond(context, uncond, mask)
    assert torch.equal(mixed[mask], torch.zeros_like(context[mask]))
    assert torch.equal(mixed[~mask], context[~mask])


# --- config ------------------------------------------------------------------------------------------


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="text.kind.*scratch | clip | openclip"):  # the registry's names
        build_text_encoder(TextEncoderConfig(kind="t5"))
    with pytest.raises(ConfigError, match="text.layer"):
        TextEncoderConfig(layer="middle")
    with pytest.raises(ConfigError, match="text.name_or_path"):
        TextEncoderConfig(kind="clip")
    with pytest.raises(ConfigError, match="text.p_uncond"):
        TextEncoderConfig(p_uncond=1.0)
    with pytest.raises(ConfigError, match="text.hidden_size"):
        TextEncoderConfig(hidden_size=130, num_heads=4)
    with pytest.raises(ConfigError, match="penultimate"):
        TextEncoderConfig(layer="penultimate")
    assert TextEncoderConfig().trainable
    assert not TextEncoderConfig(kind="openclip", name_or_path="ViT-H-14").trainable
    assert TextEncoderConfig(kind="clip", name_or_path="x/y", train=True).trainable
    cfg = load_config(TextEncoderConfig, overrides=["p_uncond=0.2", "train=false"])
    assert cfg.p_uncond == 0.2 and not cfg.trainable


def test_deduplicated_encoding_gives_the_same_context_and_gradients():
    import torch

    from conditioning import TextEncoderConfig, build_text_encoder

    torch.manual_seed(0)
    encoder = build_text_encoder(
        TextEncoderConfig(hidden_size=32, num_heads=2, intermediate_size=64, max_length=8)
    )
    ids = encoder.tokenize(["a red circle", "", "a red circle", "a blue square", ""])
    grads, contexts = [], []
    weights = torch.randn(5, 8, 32, generator=torch.Generator().manual_seed(1))
    for dedup in (False, True):
        encoder.zero_grad()
        context = encoder(ids, deduplicate=dedup)
        (context * weights).sum().backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
        contexts.append(context.detach())
    torch.testing.assert_close(contexts[0], contexts[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # float32 sums in another order


def test_captions_over_the_context_are_truncated_with_one_warning(caplog):
    import logging

    from conditioning import TextEncoderConfig, build_text_encoder

    encoder = build_text_encoder(
        TextEncoderConfig(hidden_size=32, num_heads=2, intermediate_size=64, max_length=8)
    )
    long = "a red circle on a black background with a blue square beside it"
    with caplog.at_level(logging.WARNING):
        ids = encoder.tokenize([long, "a red circle"])
        encoder.tokenize([long])
    assert ids.shape == (2, 8)
    assert caplog.text.count("truncated") == 1 and "1 caption(s)" in caplog.text
