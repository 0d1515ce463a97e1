"""Caption controls (``caption.*``): tag shuffle with kept leading tags, tag dropout, prefix and
suffix, drawn from the step's random stream so that a resumed run equals an uninterrupted one."""

import pytest
import torch
from conftest import tiny_autoencoder
from test_ldm_train import tiny

from ldm.core.errors import ConfigError
from ldm.data.captions import MAX_TAGS, CaptionConfig, transform_caption
from ldm.train.diffusion import train_ldm
from ldm.training.metrics import read_metrics

CAPTION = "my-cat, photo, red collar, sitting, grass, sunny day, close-up"


def draws(seed: int) -> torch.Tensor:
    return torch.rand(2 * MAX_TAGS, generator=torch.Generator().manual_seed(seed))


def test_tag_shuffle_keeps_the_first_keep_tokens_tags_in_place():
    cfg = CaptionConfig(shuffle_tags=True, keep_tokens=2)
    orders = set()
    for seed in range(50):
        tags = transform_caption(CAPTION, cfg, draws(seed)).split(", ")
        assert tags[:2] == ["my-cat", "photo"]
        assert sorted(tags[2:]) == sorted(CAPTION.split(", ")[2:])  # the same tags, reordered
        orders.add(tuple(tags[2:]))
    assert len(orders) > 30  # 5! = 120 orders: 50 draws give about 41 distinct ones


def test_tag_dropout_drops_the_other_tags_at_its_rate_never_the_kept_ones():
    cfg = CaptionConfig(tag_dropout=0.3, keep_tokens=1)
    kept = [transform_caption(CAPTION, cfg, draws(seed)).split(", ") for seed in range(400)]
    assert all(tags[0] == "my-cat" for tags in kept)
    rate = 1 - sum(len(tags) - 1 for tags in kept) / (400 * 6)
    assert 0.25 < rate < 0.35
    assert all(
        tags[1:] == [t for t in CAPTION.split(", ")[1:] if t in tags[1:]] for tags in kept
    )  # order kept


def test_prefix_and_suffix_are_added_after_the_controls_and_defaults_change_nothing():
    cfg = CaptionConfig(prefix="sks", suffix="best quality", shuffle_tags=True)
    out = transform_caption("a, b, c", cfg, draws(0))
    assert out.startswith("sks ") and out.endswith(" best quality")
    assert transform_caption(CAPTION, CaptionConfig(), None) == CAPTION
    assert transform_caption("", CaptionConfig(prefix="sks"), None) == "sks"  # (a dropped caption stays "")


def test_bad_caption_settings_are_refused():
    with pytest.raises(ConfigError, match="tag_dropout"):
        CaptionConfig(tag_dropout=1.0)
    with pytest.raises(ConfigError, match="keep_tokens"):
        CaptionConfig(keep_tokens=-1)
    with pytest.raises(ConfigError, match="separator"):
        CaptionConfig(separator="")


def test_a_resumed_run_with_caption_controls_equals_an_uninterrupted_one(tmp_path):
    vae = tmp_path / "vae"
    tiny_autoencoder(scaling_factor=0.8).save_pretrained(vae)
    # "a red circle on a black background": split on "on", two tags (the first kept), so the shuffle,
    # the dropout and the kept tag all act on the shapes captions
    controls = ["caption.shuffle_tags=true", "caption.tag_dropout=0.3", "caption.prefix=sks",
                "caption.separator=on", "caption.keep_tokens=1", "eval.num_samples=0",
                "train.checkpoint_every=3"]  # fmt: skip
    whole = train_ldm(tiny(tmp_path / "whole", vae, *controls))
    train_ldm(tiny(tmp_path / "parts", vae, *controls, "train.stop_at=3"))
    parts = train_ldm(tiny(tmp_path / "parts", vae, *controls), resume="latest")
    losses = lambda out: [r["train/loss"] for r in read_metrics(out / "metrics.jsonl")]  # noqa: E731
    assert losses(whole) == losses(parts) and len(losses(whole)) == 6
    plain = train_ldm(tiny(tmp_path / "plain", vae, "eval.num_samples=0"))
    assert losses(plain) != losses(whole)  # the controls changed what was trained on
