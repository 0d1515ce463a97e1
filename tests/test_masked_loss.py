"""Masked loss (``data.masked_loss``): per-pixel weights from mask files or alpha channels."""

import numpy as np
import pytest
import torch
from conftest import finetune_config, save_tiny_sd_pipeline
from PIL import Image

from ldm.core.config import DataConfig
from ldm.core.errors import DataError
from ldm.core.randomness import StepRandom
from ldm.data import build_dataset
from ldm.diffusion.config import NoiseConfig
from ldm.diffusion.registry import build_objective
from ldm.train.diffusion import train_ldm


@pytest.mark.parametrize("objective", ["ddpm", "rectified_flow"])
def test_all_ones_equals_the_plain_loss_and_a_half_mask_stops_the_other_half(objective):
    obj = build_objective(NoiseConfig(objective=objective))
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    weight = torch.nn.Parameter(torch.ones(1, 4, 8, 8))

    def denoiser(z_t, t):
        return z_t * weight

    plain = obj.loss(denoiser, z0, StepRandom(0, 0))
    ones = obj.loss(denoiser, z0, StepRandom(0, 0), torch.ones(2, 1, 8, 8))
    assert torch.equal(plain, ones)
    half = torch.zeros(2, 1, 8, 8)
    half[..., 4:] = 1.0  # the right half trains
    obj.loss(denoiser, z0, StepRandom(0, 0), half).backward()
    assert torch.all(weight.grad[..., :4] == 0) and torch.all(weight.grad[..., 4:].abs() > 0)


def masked_folder(root, mask_size=None, black=False):
    """Four 32 px images: "a" with a mask file (left half black), "b" with alpha (top half clear), two plain;
    ``black``: every image with an all-black mask file."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        if name == "b":
            alpha = np.full((32, 32, 1), 255, np.uint8)
            alpha[:16] = 0
            Image.fromarray(np.concatenate([pixels, alpha], -1), "RGBA").save(root / f"{name}.png")
        else:
            Image.fromarray(pixels).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a picture {name}")
    mask = np.full(mask_size or (32, 32), 255, np.uint8)
    mask[:, :16] = 0
    Image.fromarray(mask, "L").save(root / "a-masklabel.png")
    for name in ("a", "b", "c", "d") if black else ():
        Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(root / f"{name}-masklabel.png")
    return root


def test_masks_come_from_mask_files_and_alpha_and_default_to_ones(tmp_path):
    root = masked_folder(tmp_path / "data")
    cfg = DataConfig(
        dataset="folder", path=str(root), resolution=16, flip=False, val_size=0, masked_loss=True
    )
    data = build_dataset(cfg, "train", seed=0)
    assert len(data) == 4  # the mask file is no training image
    masks = {data[i]["caption"][-1]: data[i]["mask"] for i in range(len(data))}
    assert masks["a"].shape == (1, 16, 16)
    assert torch.all(masks["a"][..., :7] == 0) and torch.all(masks["a"][..., 9:] == 1)  # left half ignored
    assert torch.all(masks["b"][:, :7] == 0) and torch.all(masks["b"][:, 9:] == 1)  # transparent top ignored
    assert torch.all(masks["c"] == 1)
    plain = DataConfig(dataset="folder", path=str(root), resolution=16, flip=False, val_size=0)
    assert "mask" not in build_dataset(plain, "train", seed=0)[0]


def test_the_latent_cache_keeps_each_mask_at_the_latents_size(tmp_path):
    from conftest import tiny_autoencoder

    from ldm.data.cache import cached_latents

    root = masked_folder(tmp_path / "data")
    cfg = DataConfig(
        dataset="folder", path=str(root), resolution=16, flip=False, val_size=0, masked_loss=True
    )
    latents = cached_latents(tiny_autoencoder(1.0), build_dataset(cfg, "train", seed=0), batch_size=3)
    items = {latents[i]["caption"][-1]: latents[i] for i in range(len(latents))}
    mask = items["a"]["mask"]  # f=2: 16 px -> 8
    assert mask.shape == (1, 8, 8) and items["a"]["mean"].shape[-2:] == (8, 8)
    assert torch.all(mask[..., :3] == 0) and torch.all(mask[..., 5:] == 1)
    assert torch.all(items["d"]["mask"] == 1)


def test_the_bucketed_latent_cache_keeps_each_mask_at_its_latents_size(tmp_path):
    from conftest import tiny_autoencoder

    from ldm.data.cache import cached_latents

    root = masked_folder(tmp_path / "data")
    wide = np.full((24, 48), 255, np.uint8)
    wide[:, :24] = 0  # the left half ignored
    Image.fromarray(np.zeros((24, 48, 3), np.uint8)).save(root / "e.png")
    (root / "e.txt").write_text("a picture e")
    Image.fromarray(wide, "L").save(root / "e-masklabel.png")
    cfg = DataConfig(dataset="folder", path=str(root), resolution=32, flip=False, val_size=0, masked_loss=True,
                     buckets=True)  # fmt: skip
    data = build_dataset(cfg, "train", seed=0, bucket_step=8)
    latents = cached_latents(tiny_autoencoder(1.0), data, batch_size=3)
    items = {latents[i]["caption"][-1]: latents[i] for i in range(len(latents))}
    for item in items.values():
        assert item["mask"].shape[-2:] == item["mean"].shape[-2:]
    wide_mask = items["e"]["mask"]  # a wider bucket than the squares'
    assert wide_mask.shape[-1] > wide_mask.shape[-2] and items["a"]["mask"].shape == (1, 16, 16)
    half = wide_mask.shape[-1] // 2
    assert torch.all(wide_mask[..., : half - 1] == 0) and torch.all(wide_mask[..., half + 1 :] == 1)


@pytest.mark.parametrize("buckets", [False, True])
def test_the_disk_cache_keeps_the_masks_the_memory_cache_keeps(tmp_path, buckets):
    from conftest import tiny_autoencoder

    from ldm.data.cache import cached_latents
    from ldm.data.disk_cache import DiskLatentDataset, build_disk_cache

    root = masked_folder(tmp_path / "data")
    cfg = DataConfig(dataset="folder", path=str(root), resolution=32, flip=False, val_size=0, masked_loss=True,
                     buckets=buckets)  # fmt: skip
    data = build_dataset(cfg, "train", seed=0, bucket_step=8)
    vae = tiny_autoencoder(1.0)
    memory = cached_latents(vae, data, batch_size=3)
    folder = build_disk_cache(vae, data, 3, tmp_path / "cache", "key", per_shard=3)
    disk = DiskLatentDataset(folder, getattr(data, "bucket_of", None))
    for i in range(len(data)):
        assert torch.equal(disk[i]["mask"], memory[i]["mask"]) and disk[i]["mask"].shape == (1, 16, 16)
    items = {disk[i]["caption"][-1]: disk[i] for i in range(len(disk))}
    assert torch.all(items["a"]["mask"][..., :7] == 0) and torch.all(items["c"]["mask"] == 1)


def test_a_mask_of_another_size_is_refused_before_training(tmp_path):
    root = masked_folder(tmp_path / "data", mask_size=(20, 32))
    cfg = DataConfig(dataset="folder", path=str(root), resolution=16, val_size=0, masked_loss=True)
    with pytest.raises(DataError, match=r"a-masklabel.png is 32x20, its image 32x32"):
        build_dataset(cfg, "train", seed=0)


@pytest.mark.parametrize("cache", ["true", "false", "disk"])
def test_masked_fine_tune_reaches_the_loss_with_and_without_the_latent_cache(cache, tmp_path):
    """Black masks everywhere: the training loss is exactly 0 at every step (the masks reach it)."""
    from ldm.training.metrics import read_metrics

    sd = save_tiny_sd_pipeline(tmp_path / "tiny-sd")

    def run(name, black):
        root = masked_folder(tmp_path / f"data-{name}", black=black)
        cfg = finetune_config(tmp_path / name, sd, root, "data.masked_loss=true", "data.buckets=false",
                              "data.resolution=32", f"cache_latents={cache != 'false'}".lower(), "data.val_size=1",
                              "preflight.samples=0",
                              *([f"cache_dir={tmp_path / 'cache'}"] if cache == "disk" else []))  # fmt: skip
        out = train_ldm(cfg)
        assert (out / "model" / "model_index.json").exists()
        return [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]

    assert set(run("black", True)) == {0.0}
    if cache == "true":  # (once is enough: the partial masks leave a loss)
        assert all(loss > 0 for loss in run("masked", False))
