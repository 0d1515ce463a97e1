"""Textual inversion and pivotal tuning: new tokens' rows train alone (or with a LoRA), saved as
diffusers' ``load_textual_inversion`` reads them; SD and SDXL."""

import pytest
import torch
from conftest import finetune_config, save_tiny_sd_pipeline, save_tiny_sdxl_pipeline
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from conditioning import build_clip_tokenizer
from conditioning.new_tokens import AddedTokenEmbedding, add_new_tokens, fuse_new_tokens, token_embedding
from ldm.core.config import load_config
from ldm.core.errors import ConfigError
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.samplers import make_scheduler
from ldm.train.config import LDMRunConfig
from ldm.train.diffusion import train_ldm

TOKEN = "<my-shape>"
PROMPT = f"a {TOKEN} on a black background"
TI = [f"ti.tokens=['{TOKEN}']", "ti.init=[circle]", f"caption.prefix='{TOKEN}, '", "preflight.samples=0"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


def tiny_text():
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16)  # fmt: skip
    return CLIPTextModel(config).eval(), build_clip_tokenizer(16)


def test_new_rows_start_from_the_init_word_and_leave_the_vocabulary_alone():
    model, tokenizer = tiny_text()
    table = token_embedding(model).weight.detach().clone()
    ids = add_new_tokens(model, tokenizer, ["<a>", "<b>"], ["red circle", "square"], vectors=2)
    assert ids == list(range(49408, 49412))
    assert tokenizer.convert_tokens_to_ids(["<a>", "<a>_1", "<b>", "<b>_1"]) == ids
    circle = tokenizer("red circle", add_special_tokens=False).input_ids
    embedding = token_embedding(model)
    assert isinstance(embedding, AddedTokenEmbedding)
    torch.testing.assert_close(embedding.added[0], table[circle].mean(0))
    torch.testing.assert_close(embedding.added[1], table[circle].mean(0))  # every vector from the word
    old = torch.tensor([[49406, 320, 1000, 49407]])
    torch.testing.assert_close(embedding(old), table[old])  # base rows exactly as before
    mixed = torch.tensor([[49406, 49410, 320]])
    torch.testing.assert_close(embedding(mixed)[0, 1], embedding.added[2])
    fuse_new_tokens(model)  # one plain table, as save_pretrained writes it
    fused = token_embedding(model)
    assert isinstance(fused, torch.nn.Embedding) and fused.num_embeddings == 49412
    assert model.config.vocab_size == 49412


@pytest.mark.parametrize(
    "tokens, init, message",
    [
        (["star"], ["circle"], "already exists in the tokenizer's vocabulary"),
        (["<Star>"], ["circle"], "lower case"),
        (["<a>", "<a>"], ["circle", "circle"], "repeats a token"),
        (["<a>", "<a>_1"], ["circle", "circle"], "extra vectors are named"),
    ],
)
def test_bad_new_tokens_are_refused(tokens, init, message):
    model, tokenizer = tiny_text()
    with pytest.raises(ConfigError, match=message):
        add_new_tokens(model, tokenizer, tokens, init, vectors=1)


def test_old_clip_configs_pool_at_the_end_of_text_not_at_the_new_token():
    """SD 1.x / SDXL configs carry eos_token_id 2: transformers then pools at the largest id, which a
    new token would be; adding tokens makes it pool at the end-of-text token, as before for old ids."""
    model, tokenizer = tiny_text()
    body = getattr(model, "text_model", model)  # transformers < 5 nests the modules under .text_model
    model.config.eos_token_id = body.eos_token_id = 2
    old = tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    before = model(input_ids=old).pooler_output
    add_new_tokens(model, tokenizer, ["<a>"], ["circle"], vectors=1)
    torch.testing.assert_close(model(input_ids=old).pooler_output, before)  # old captions: unchanged
    ids = tokenizer(["a <a> circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    out = model(input_ids=ids)
    end = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, end])


def test_bad_textual_inversion_configs_are_refused(tmp_path):
    def config(*extra):
        return load_config(LDMRunConfig, None, [f"output_dir={tmp_path}", *extra])

    with pytest.raises(ConfigError, match="one init word per token"):
        config(f"ti.tokens=['{TOKEN}']")
    with pytest.raises(ConfigError, match="set text.train=false"):  # a scratch encoder trains by default
        config(f"ti.tokens=['{TOKEN}']", "ti.init=[circle]")
    with pytest.raises(ConfigError, match="Prodigy takes one lr"):
        config(f"ti.tokens=['{TOKEN}']", "ti.init=[circle]", "text.train=false", "lora.rank=2", "ti.lr=0.5",
               "train.optimizer=prodigy", "train.lr=1.0")  # fmt: skip
    with pytest.raises(ConfigError, match="set lora.merge=true"):
        config(
            f"ti.tokens=['{TOKEN}']", "ti.init=[circle]", "text.train=false", "lora.rank=2", "ti.merge=true"
        )


def ddim_image(pipe, prompt: str, shape=(1, 4, 24, 24)) -> torch.Tensor:
    latents = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if isinstance(pipe, LatentDiffusionPipeline):
        return pipe(prompt, num_inference_steps=3, guidance_scale=3.0, sampler="ddim", latents=latents,
                    output_type="pt").images  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)  # the same sampler as ours
    return pipe(prompt, num_inference_steps=3, guidance_scale=3.0, latents=latents, output_type="pt").images


def test_textual_inversion_trains_only_the_new_rows_and_loads_in_diffusers(tmp_path, sd_folder, mixed_folder):
    out = train_ldm(finetune_config(tmp_path / "ti", sd_folder, mixed_folder, *TI, "ti.vectors=2", "ti.lr=5e-2",
                                    "ti.merge=true"))  # fmt: skip
    file = out / "embeddings" / "my-shape.safetensors"
    with safe_open(file, "pt") as f:
        assert list(f.keys()) == [TOKEN] and f.metadata()["token"] == TOKEN
        rows = f.get_tensor(TOKEN)
    assert rows.shape == (2, 32)
    base = StableDiffusionPipeline.from_pretrained(sd_folder)
    circle = base.tokenizer("circle", add_special_tokens=False).input_ids
    start = base.text_encoder.get_input_embeddings().weight[circle].mean(0).detach()
    assert (rows - start).abs().max() > 1e-3  # the rows trained

    theirs = StableDiffusionPipeline.from_pretrained(sd_folder)
    theirs.load_textual_inversion(str(file))  # diffusers' loader, the token from the file's key
    ours = LatentDiffusionPipeline.from_pretrained(sd_folder, channels_last=False)
    assert ours.load_textual_inversion(out / "embeddings") == [TOKEN]
    # a two-vector token: both pipelines expand "<my-shape>" to "<my-shape> <my-shape>_1"
    assert ours.conditioner.encoders[0].tokenize([PROMPT])[0, 2:4].tolist() == [49408, 49409]
    torch.testing.assert_close(ddim_image(ours, PROMPT), ddim_image(theirs, PROMPT), rtol=0, atol=1e-4)
    plain = StableDiffusionPipeline.from_pretrained(sd_folder)
    assert (ddim_image(theirs, PROMPT) - ddim_image(plain, PROMPT)).abs().max() > 1e-3  # the token matters

    merged = StableDiffusionPipeline.from_pretrained(out / "model")  # ti.merge=true: the base + the rows
    for a, b in zip(merged.unet.parameters(), plain.unet.parameters(), strict=True):
        assert torch.equal(a, b)  # textual inversion trains nothing else
    table, old = (
        merged.text_encoder.get_input_embeddings().weight,
        plain.text_encoder.get_input_embeddings().weight,
    )
    assert table.shape == (49410, 32) and torch.equal(table[:49408], old)
    torch.testing.assert_close(table[49408:], rows)
    torch.testing.assert_close(ddim_image(merged, PROMPT), ddim_image(theirs, PROMPT), rtol=0, atol=1e-4)


def test_textual_inversion_resumes_exactly(tmp_path, sd_folder, mixed_folder):
    common = [*TI, "ti.lr=5e-2", "train.max_steps=4", "train.checkpoint_every=2"]
    whole = train_ldm(finetune_config(tmp_path / "whole", sd_folder, mixed_folder, *common))
    train_ldm(finetune_config(tmp_path / "part", sd_folder, mixed_folder, *common, "train.stop_at=2"))
    resumed = train_ldm(finetune_config(tmp_path / "part", sd_folder, mixed_folder, *common), resume="latest")

    def rows(out):
        with safe_open(out / "embeddings" / "my-shape.safetensors", "pt") as f:
            return f.get_tensor(TOKEN)

    torch.testing.assert_close(rows(resumed), rows(whole), rtol=0, atol=0)
    assert not (whole / "model").exists()  # without ti.merge: the rows only, the base model is unchanged


def test_pivotal_tuning_saves_rows_and_lora_and_the_merged_model(tmp_path, sd_folder, mixed_folder):
    cfg = finetune_config(tmp_path / "pivotal", sd_folder, mixed_folder, *TI, "ti.lr=5e-2", "lora.rank=4",
                          "lora.merge=true")  # fmt: skip
    out = train_ldm(cfg)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    theirs = StableDiffusionPipeline.from_pretrained(sd_folder)
    theirs.load_textual_inversion(str(out / "embeddings" / "my-shape.safetensors"))
    theirs.load_lora_weights(out / "lora")
    both = ddim_image(theirs, PROMPT)
    ours = LatentDiffusionPipeline.from_pretrained(sd_folder, channels_last=False)
    ours.load_textual_inversion(out / "embeddings")
    ours.load_lora_weights(out / "lora")
    torch.testing.assert_close(ddim_image(ours, PROMPT), both, rtol=0, atol=1e-4)
    merged = StableDiffusionPipeline.from_pretrained(out / "model")  # the rows in its tokenizer and table
    assert merged.tokenizer.convert_tokens_to_ids(TOKEN) == 49408
    torch.testing.assert_close(ddim_image(merged, PROMPT), both, rtol=0, atol=1e-4)


def test_sdxl_textual_inversion_trains_both_encoders_rows(tmp_path, mixed_folder):
    folder = save_tiny_sdxl_pipeline(tmp_path / "tiny-sdxl")
    out = train_ldm(finetune_config(tmp_path / "xl", folder, mixed_folder, *TI, "ti.lr=5e-2"))
    file = out / "embeddings" / "my-shape.safetensors"
    with safe_open(file, "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        widths = (f.get_tensor("clip_l").shape, f.get_tensor("clip_g").shape)
    base = StableDiffusionXLPipeline.from_pretrained(folder)
    assert widths == ((1, base.text_encoder.config.hidden_size), (1, base.text_encoder_2.config.hidden_size))
    theirs = StableDiffusionXLPipeline.from_pretrained(folder)
    rows = {}
    with safe_open(file, "pt") as f:
        rows = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    theirs.load_textual_inversion(rows["clip_l"], token=TOKEN, text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)  # fmt: skip
    theirs.load_textual_inversion(rows["clip_g"], token=TOKEN, text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)  # fmt: skip
    ours = LatentDiffusionPipeline.from_pretrained(folder, channels_last=False)
    assert ours.load_textual_inversion(file) == [TOKEN]  # the token from the file's metadata
    shape = (1, 4, 16, 16)
    torch.testing.assert_close(
        ddim_image(ours, PROMPT, shape), ddim_image(theirs, PROMPT, shape), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("preset", ["textual-inversion", "pivotal"])
def test_presets_run_on_a_tiny_model(preset, tmp_path, sd_folder, mixed_folder):
    cfg = load_config(
        LDMRunConfig,
        f"configs/ldm/{preset}.yaml",
        [f"output_dir={tmp_path / preset}", f"pretrained={sd_folder}", f"data.path={mixed_folder}",
         "data.resolution=48", "data.buckets=true", "data.repeats=1", "train.batch_size=2", "train.max_steps=2",
         "train.sample_every=0", "train.checkpoint_every=0", "sample.steps=2", "sample.grid_seeds=1",
         "eval.num_samples=2", "eval.batch_size=2", "preflight.samples=0"],
    )  # fmt: skip
    out = train_ldm(cfg)
    assert (out / "embeddings" / "my-concept.safetensors").exists()
    assert (out / "lora").exists() == (preset == "pivotal")
    assert (out / "samples" / "final.png").exists()


def test_the_validation_loss_reads_captions_with_the_prefix_and_moves(tmp_path, sd_folder, mixed_folder):
    """Held-out captions get caption.prefix (the new token) as training captions do: with everything
    but the rows frozen, the validation loss moves only because of that."""
    import json

    out = train_ldm(finetune_config(tmp_path / "val", sd_folder, mixed_folder, *TI, "ti.lr=5e-2",
                                    "train.max_steps=3", "train.val_every=1"))  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(losses) >= 2 and len(set(losses)) == len(losses)
