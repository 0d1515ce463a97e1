"""Concept datasets (``data.dataset=sources``) and DreamBooth prior preservation."""

import itertools

import numpy as np
import pytest
import torch
from conftest import save_tiny_sd_pipeline
from PIL import Image

from ldm.core.config import DataConfig, SourceConfig, load_config
from ldm.core.errors import ConfigError
from ldm.data import build_dataset
from ldm.data.concepts import SourceView
from ldm.train.config import LDMRunConfig
from ldm.train.diffusion import train_ldm
from ldm.train.sources import SourceTerms
from ldm.training.metrics import read_metrics
from ldm.training.sampler import ResumableSampler


def image_folder(root, n, caption, seed=0):
    """``n`` random 32 px images, captioned "``caption`` i" (``caption`` None: no captions)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        if caption is not None:
            (root / f"{i}.txt").write_text(f"{caption} {i}")
    return root


def test_grouped_sampler_keeps_pairs_resumes_and_splits_over_ranks():
    full = list(itertools.islice(iter(ResumableSampler(12, seed=3, group=2)), 40))
    indices = [i for i, _ in full]
    assert all(
        a // 2 == b // 2 and a % 2 == 0 and b == a + 1
        for a, b in zip(indices[::2], indices[1::2], strict=True)
    )
    assert sorted(indices[:12]) == list(range(12)) and indices[:12] != indices[12:24]
    assert len({s for _, s in full}) == len(full)
    for start in (5, 14):  # mid-pair and on a pair boundary
        assert (
            list(itertools.islice(iter(ResumableSampler(12, seed=3, start=start, group=2)), 10))
            == full[start : start + 10]
        )
    # two ranks interleave the global order: together (one item a step each) they take whole pairs
    r0 = list(itertools.islice(iter(ResumableSampler(12, seed=3, rank=0, num_replicas=2, group=2)), 8))
    r1 = list(itertools.islice(iter(ResumableSampler(12, seed=3, rank=1, num_replicas=2, group=2)), 8))
    assert [x for pair in zip(r0, r1, strict=True) for x in pair] == full[:16]
    resumed = list(
        itertools.islice(iter(ResumableSampler(12, seed=3, start=6, rank=1, num_replicas=2, group=2)), 4)
    )
    assert resumed == r1[3:7]
    plain = list(itertools.islice(iter(ResumableSampler(7, seed=1)), 14))  # group 1: the old order
    order = [int(i) for e in range(2) for i in ResumableSampler(7, seed=1)._permutation(e)]
    assert [i for i, _ in plain] == order


def test_sources_are_counted_paired_and_captioned(tmp_path):
    a = image_folder(tmp_path / "a", 5, "cat")
    b = image_folder(tmp_path / "b", 3, "dog", seed=1)
    reg = image_folder(tmp_path / "reg", 4, None, seed=2)
    (reg / "3.txt").write_text("my own class caption")
    sources = [
        SourceConfig(path=str(a), repeats=2, prefix="sks"),
        SourceConfig(path=str(b), repeats=1),
        SourceConfig(path=str(reg), role="regularization", class_prompt="a photo of a pet"),
    ]
    cfg = DataConfig(dataset="sources", sources=sources, resolution=16, val_size=1)
    train = build_dataset(cfg, "train", seed=0)
    assert isinstance(train, SourceView) and train.group == 2
    # a: 4 kept x 2 repeats, b: 2 kept x 1; reg: all 4 (never held out); pairs: max(10, 4) = 10
    assert [len(p) for p in train.base.parts] == [4, 2, 4]
    assert len(train) == 20 and train.source_counts(3) == [8, 2, 10]
    assert all(train[i]["source"] != 2 for i in range(0, 20, 2)) and all(
        train[i]["source"] == 2 for i in range(1, 20, 2)
    )
    # class images without a caption get the class prompt; one with its own keeps it
    assert {train[i]["caption"] for i in range(1, 20, 2)} == {"a photo of a pet", "my own class caption"}
    val = build_dataset(cfg, "val", seed=0)
    captions = [val[i]["caption"] for i in range(len(val))]
    assert len(captions) == 2 and sum(c.startswith("sks cat ") for c in captions) == 1  # the source prefix
    plain = build_dataset(
        DataConfig(dataset="sources", sources=sources[:2], resolution=16, val_size=0), "train", 0
    )
    assert plain.group == 1 and len(plain) == 13 and plain.source_counts(2) == [10, 3]


def test_source_terms_weight_drop_and_caption_each_item():
    cfg = load_config(
        LDMRunConfig,
        None,
        [
            "data.dataset=sources",
            "data.sources=[{path: a, prefix: sks, caption_dropout: 0.5}, "
            "{path: r, role: regularization, class_prompt: 'a dog'}]",
            "data.prior_loss_weight=0.25",
            "caption.prefix=photo",
            "text.p_uncond=0.1",
        ],
    )
    terms = SourceTerms.of(cfg, torch.device("cpu"))
    sources = torch.tensor([0, 1, 0, 1])
    assert terms.weight[sources].tolist() == [1.0, 0.25, 1.0, 0.25]
    assert terms.p_uncond[sources].tolist() == pytest.approx([0.5, 0.1, 0.5, 0.1])
    train_cfg, reg_cfg = terms.captions(torch.tensor([0, 1]))
    assert (train_cfg.prefix, reg_cfg.prefix) == ("photo sks", "")  # class images get no trigger word
    roles = terms.role_terms(torch.tensor([1.0, 10.0, 3.0, 30.0]), sources)
    assert roles["loss_instance"].tolist() == [4.0, 2.0] and roles["loss_prior"].tolist() == [40.0, 2.0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.dataset=sources", "data.sources=[{path: a, class_prompt: 'a dog'}]"],
            "belong to a role=regularization",
        ),
        (
            ["data.dataset=sources", "data.sources=[{path: a}, {path: r, role: regularization}]"],
            "needs class_prompt",
        ),
        (
            ["data.dataset=sources", "data.sources=[{path: r, role: regularization, class_prompt: x}]"],
            "no role=train",
        ),
        (["data.dataset=folder", "data.path=a", "data.sources=[{path: a}]"], "set data.dataset=sources"),
        (["data.dataset=sources", "data.path=a", "data.sources=[{path: a}]"], "leave data.path unset"),
        (["data.dataset=sources"], "needs data.sources"),
        (["data.dataset=sources", "data.sources=[{path: a, role: prior}]"], "train | regularization"),
        (
            [
                "data.dataset=sources",
                "data.sources=[{path: a}, {path: a/class, role: regularization, class_prompt: x}]",
            ],
            "overlap",
        ),
        (
            ["data.dataset=sources", "data.repeats=2", "data.sources=[{path: a}]"],
            "give each source its repeats",
        ),
        (
            [
                "data.dataset=sources",
                "data.sources=[{path: a}, {path: r, role: regularization, class_prompt: x, "
                "num_class_images: 4}]",
            ],
            "set pretrained=PATH",
        ),
    ],
)
def test_bad_source_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(LDMRunConfig, None, overrides)


def test_class_image_names_fill_gaps_and_an_empty_class_folder_is_explained(tmp_path):
    from ldm.core.errors import DataError
    from ldm.train.sources import free_names

    folder = image_folder(tmp_path / "class", 0, None)
    for n in (0, 2):
        Image.new("RGB", (8, 8)).save(folder / f"class-{n:05d}.png")
    (folder / "class-00001.txt").write_text("a prompt whose image never came")  # an interrupted draw
    assert free_names(folder, 3) == [(1, "class-00001"), (3, "class-00003"), (4, "class-00004")]
    empty = image_folder(tmp_path / "none", 0, None)
    cfg = DataConfig(dataset="sources", resolution=16, sources=[
        SourceConfig(path=str(image_folder(tmp_path / "a", 2, "x"))),
        SourceConfig(path=str(empty), role="regularization", class_prompt="a dog"),
    ])  # fmt: skip
    with pytest.raises(DataError, match="holds no class images: set its num_class_images"):
        build_dataset(cfg, "train", seed=0)


def test_dreambooth_draws_class_images_once_and_logs_both_losses(tmp_path, caplog):
    model = save_tiny_sd_pipeline(tmp_path / "sd")
    concept = image_folder(tmp_path / "concept", 4, "sks toy")
    reg = tmp_path / "class"  # not there yet: the base model draws it
    overrides = [
        f"output_dir={tmp_path / 'run'}", f"pretrained={model}", "data.dataset=sources", "data.resolution=32",
        f"data.sources=[{{path: {concept}, repeats: 2}}, {{path: {reg}, role: regularization, "
        "class_prompt: 'a toy', num_class_images: 3}]",
        "data.val_size=0", "data.prior_loss_weight=0.5", "lora.rank=4", "train.batch_size=2", "train.max_steps=4",
        "train.stop_at=2", "train.lr=1e-3", "train.lr_warmup_steps=0", "train.ema_decay=0", "train.log_every=1",
        "train.sample_every=0", "train.checkpoint_every=2", "train.val_every=0", "sample.steps=2",
        "sample.grid_prompts=1", "sample.grid_seeds=1", "eval.num_samples=2", "eval.batch_size=2",
        "train.compile=false",
    ]  # fmt: skip
    cfg = load_config(LDMRunConfig, None, overrides)
    with caplog.at_level("INFO", logger="ldm"):
        train_ldm(cfg)
    drawn = sorted(reg.glob("*.png"))
    assert [p.name for p in drawn] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert (reg / "class-00000.txt").read_text() == "a toy\n" and not list(reg.glob(".*"))
    before = {p: p.read_bytes() for p in drawn}
    assert "drawing 3 for 'a toy'" in caplog.text
    assert "each global batch holds as many class images as instance images" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="ldm"):
        train_ldm(load_config(LDMRunConfig, None, [*overrides, "train.stop_at=null"]), resume="latest")
    assert "drawing" not in caplog.text  # reused on resume
    assert {p: p.read_bytes() for p in sorted(reg.glob("*.png"))} == before
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:  # one instance and one class image a batch; the loss is their weighted mean
        expected = (m["train/loss_instance"] + 0.5 * m["train/loss_prior"]) / 2
        assert m["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert (tmp_path / "run" / "lora").is_dir()


def test_ldm_cache_draws_the_class_images_and_training_reads_its_disk_cache(tmp_path, caplog):
    from ldm.cli.cache import main as cache_main

    model = save_tiny_sd_pipeline(tmp_path / "sd")
    concept = image_folder(tmp_path / "concept", 3, "sks toy")
    reg = tmp_path / "class"
    common = [
        f"pretrained={model}", "data.dataset=sources", "data.resolution=32", "data.val_size=0",
        f"data.sources=[{{path: {concept}}}, {{path: {reg}, role: regularization, class_prompt: 'a toy', "
        "num_class_images: 2}]", f"cache_dir={tmp_path / 'cache'}", "sample.steps=2",
    ]  # fmt: skip
    assert cache_main(common) == 0
    assert sorted(p.name for p in reg.glob("*.png")) == ["class-00000.png", "class-00001.png"]
    run = [f"output_dir={tmp_path / 'run'}", "lora.rank=4", "train.batch_size=2", "train.max_steps=2",
           "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0", "train.val_every=0",
           "train.compile=false", "train.ema_decay=0", "sample.grid_prompts=1", "sample.grid_seeds=1"]  # fmt: skip
    caplog.clear()
    with caplog.at_level("INFO", logger="ldm"):
        train_ldm(load_config(LDMRunConfig, None, [*common, *run]))
    assert "drawing" not in caplog.text and "disk cache: wrote" not in caplog.text  # both reused
    assert "5 items, 0.0 MiB on disk" in caplog.text  # 3 subject + 2 class images, cached once
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in m]
    assert len(steps) == 2 and all("train/loss_prior" in m and "train/loss_instance" in m for m in steps)
