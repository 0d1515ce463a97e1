"""Tests of ldm.data: loading and transforms, the shapes dataset, image folders, datasets, splits."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.core.config import DataConfig
from ldm.data import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    HFImageDataset,
    HFStreamingDataset,
    ImageFolderDataset,
    ImageTransform,
    ShapesDataset,
    ShapeSpec,
    build_dataset,
    caption,
    load_rgb,
    render,
    scan_folder,
    shape_spec,
    shape_specs,
)

# ----------------------------------------------------------------------------- helpers


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> io.BytesIO:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    buf.seek(0)
    return buf


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel(xy))


def assert_item(item: dict, resolution: int) -> None:
    x = item["pixel_values"]
    assert x.dtype == torch.float32 and x.shape == (3, resolution, resolution)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert isinstance(item["caption"], str)


# ----------------------------------------------------------------------------- load_rgb


def test_load_rgba_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (200, 10, 10, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    out = load_rgb(encode(rgba))
    assert out.mode == "RGB"
    assert pixel(out, (0, 0)) == (255, 255, 255)
    assert pixel(out, (1, 1)) == (200, 10, 10)
    assert all(120 <= v <= 135 for v in pixel(out, (2, 2)))  # half-transparent black over white


def test_load_l_la_and_palette_with_transparency():
    assert pixel(load_rgb(encode(Image.new("L", (3, 3), 77))), (1, 1)) == (77, 77, 77)
    assert pixel(load_rgb(encode(Image.new("LA", (3, 3), (50, 0)))), (1, 1)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((3, 3), 1)
    out = load_rgb(encode(pal, transparency=0))
    assert pixel(out, (0, 0)) == (255, 255, 255)  # transparent index -> white
    assert pixel(out, (3, 3)) == (200, 100, 50)
    gif = load_rgb(encode(pal, "GIF", transparency=0))
    assert gif.mode == "RGB" and pixel(gif, (3, 3)) == (200, 100, 50)


def test_load_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    out = load_rgb(encode(cmyk, "JPEG", quality=95))
    assert out.mode == "RGB"
    r, g, b = pixel(out, (8, 8))
    assert r > 240 and g < 15 and b < 15


def test_load_16_bit_png_scaled_to_8_bit():
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    out = load_rgb(encode(image))
    assert out.mode == "RGB"
    assert [pixel(out, (x, 0))[0] for x in range(4)] == [0, 100, 128, 255]


def test_load_float_and_int32_images():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [pixel(load_rgb(encode(f, "TIFF")), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    i = Image.fromarray(np.array([[0, 200, 255]], dtype=np.int32))
    assert i.mode == "I"
    assert [pixel(load_rgb(encode(i, "TIFF")), (x, 0))[0] for x in range(3)] == [0, 200, 255]


def test_load_applies_exif_orientation():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out = load_rgb(encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (20, 40)
    top, bottom = pixel(out, (10, 5)), pixel(out, (10, 35))
    assert top[0] > 200 and top[2] < 50  # the left half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


# ----------------------------------------------------------------------------- ImageTransform


def gradient_image(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1))], 2)
    rgb = np.concatenate([rgb, np.full((height, width, 1), 60.0)], 2)
    return Image.fromarray(rgb.round().astype(np.uint8))


@pytest.mark.parametrize("size", [(40, 20), (20, 50), (16, 16), (7, 9)])
def test_transform_shape_and_range(size):
    x = ImageTransform(16)(gradient_image(*size))
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16)
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_transform_center_vs_random_crop():
    image = gradient_image(64, 32)  # -> 32 x 16 after resizing: 16 columns of slack
    resized = ImageTransform(32)(image.resize((32, 16), Image.Resampling.LANCZOS).crop((0, 0, 32, 32)))
    windows = [resized[:, :16, left : left + 16] for left in range(17)]  # every 16 x 16 window
    center = ImageTransform(16, "center")(image)
    assert torch.equal(center, windows[8])
    random = ImageTransform(16, "random")
    assert torch.equal(random(image), center)  # no generator: centered, deterministic
    assert torch.equal(ImageTransform(16, "center")(image, torch.Generator().manual_seed(3)), center)
    crops = [random(image, torch.Generator().manual_seed(s)) for s in range(12)]
    offsets = [next(k for k, w in enumerate(windows) if torch.equal(w, c)) for c in crops]
    assert len(set(offsets)) > 3
    assert torch.equal(random(image, torch.Generator().manual_seed(5)), crops[5])


def test_transform_flip_needs_generator():
    image = gradient_image(24, 24)
    plain = ImageTransform(24)(image)
    flipper = ImageTransform(24, flip=True)
    assert torch.equal(flipper(image), plain)
    outs = [flipper(image, torch.Generator().manual_seed(s)) for s in range(16)]
    flipped = [torch.equal(o, plain.flip(-1)) for o in outs]
    kept = [torch.equal(o, plain) for o in outs]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


# ----------------------------------------------------------------------------- shapes


def test_caption_format():
    assert caption("red", "circle", "black") == "a red circle on a black background"
    spec = ShapeSpec("blue", "triangle", "gray", 0.5, 0.5, 0.5)
    assert spec.caption == "a blue triangle on a gray background"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_render_palette_exact(shape):
    specs = [ShapeSpec(color, shape, bg, 0.7, 0.5, 0.5) for color in COLORS for bg in BACKGROUNDS]
    images = render(specs, 32)
    assert images.dtype == torch.uint8 and images.shape == (len(specs), 3, 32, 32)
    for spec, image in zip(specs, images, strict=True):
        assert tuple(image[:, 16, 16].tolist()) == COLORS[spec.color]  # interior of the shape
        assert tuple(image[:, 0, 0].tolist()) == BACKGROUNDS[spec.background]  # background corner
        assert tuple(image[:, 31, 31].tolist()) == BACKGROUNDS[spec.background]


def test_render_is_anti_aliased_blend():
    spec = ShapeSpec("red", "circle", "white", 0.6, 0.5, 0.5)
    image = render([spec], 32)[0].long()  # (3, 32, 32)
    fg, bg = torch.tensor(COLORS["red"])[:, None, None], torch.tensor(BACKGROUNDS["white"])[:, None, None]
    t = (image[1] - bg[1]).float() / (fg[1] - bg[1])  # coverage from the green channel
    assert ((t > 0.05) & (t < 0.95)).any()  # some edge pixels are partial
    expected = (bg + (fg - bg) * t).round()
    assert (expected - image).abs().max() <= 1  # every pixel is a blend of the two colors


def test_render_geometry():
    square = render([ShapeSpec("red", "square", "black", 0.5, 0.5, 0.5)], 32)[0, 0]
    assert int((square == 220).sum()) == 16 * 16  # exactly covers pixels 8..23
    tri = render([ShapeSpec("red", "triangle", "black", 0.5, 0.5, 0.5)], 64)[0, 0].float() / 220
    area = tri.sum().item() / 64**2
    assert abs(area - 0.5 * 0.5 * 0.5 * np.sqrt(3) / 2) < 0.005
    rows = tri.sum(1)
    covered = rows.nonzero()
    assert rows[covered.min()] < rows[covered.max()]  # narrow top, wide base: it points up
    disc = render([ShapeSpec("red", "circle", "black", 0.5, 0.5, 0.5)], 64)[0, 0].float() / 220
    assert abs(disc.sum().item() / 64**2 - np.pi * 0.25**2) < 0.005


def test_shapes_items_and_determinism():
    a = ShapesDataset(64, resolution=16, seed=3)
    b = ShapesDataset(5000, resolution=16, seed=3)
    for i in (0, 7, 63):
        item_a, item_b = a[i], b[i]
        assert_item(item_a, 16)
        assert torch.equal(item_a["pixel_values"], item_b["pixel_values"])
        assert item_a["caption"] == item_b["caption"] == a.spec(i).caption
        assert a.spec(i) == shape_spec(3, "train", i)
    specs = a.specs()
    batch = render(specs, 16)
    single = torch.stack([render([s], 16)[0] for s in specs])
    assert torch.equal(batch, single)
    assert torch.equal(a.render_all(), batch)
    assert torch.equal(a[5]["pixel_values"], batch[5].float() / 127.5 - 1)
    assert ShapesDataset(64, seed=4).specs() != specs


def test_shapes_train_and_val_differ():
    train = shape_specs(0, "train", range(200))
    val = shape_specs(0, "val", range(200))
    assert not set(train) & set(val)
    captions = {s.caption for s in val}
    assert len(captions) > 30  # many of the 54 captions appear


def test_shapes_holdout():
    holdout = ["red circle", "blue square"]
    train = ShapesDataset(3000, split="train", holdout=holdout).specs()
    val = ShapesDataset(3000, split="val", holdout=holdout).specs()

    def combos(specs: list[ShapeSpec]) -> set[str]:
        return {f"{s.color} {s.shape}" for s in specs}

    assert not combos(train) & set(holdout)
    assert len(combos(train)) == 18 - 2
    assert set(holdout) <= combos(val) and len(combos(val)) == 18
    with pytest.raises(ValueError, match="colors: red, yellow"):
        ShapesDataset(10, holdout=["purple circle"])
    with pytest.raises(ValueError, match="shapes: circle, square, triangle"):
        ShapesDataset(10, holdout=["red"])


def test_shapes_size_and_position_bounds():
    for spec in shape_specs(1, "train", range(3000)):
        assert 0.35 <= spec.size <= 0.70
        height = spec.size * (np.sqrt(3) / 2 if spec.shape == "triangle" else 1.0)
        assert spec.cx - spec.size / 2 >= 0 and spec.cx + spec.size / 2 <= 1
        assert spec.cy - height / 2 >= 0 and spec.cy + height / 2 <= 1


def test_shapes_flip_reproducible_by_aug_seed():
    ds = ShapesDataset(16, resolution=16, flip=True)
    plain = ds[3]["pixel_values"]
    outs = [ds[(3, s)]["pixel_values"] for s in range(16)]
    assert all(torch.equal(o, plain) or torch.equal(o, plain.flip(-1)) for o in outs)
    assert any(not torch.equal(o, plain) for o in outs)
    assert torch.equal(ds[(3, 11)]["pixel_values"], outs[11])
    assert torch.equal(ShapesDataset(16, resolution=16, flip=True)[(3, 11)]["pixel_values"], outs[11])


# ----------------------------------------------------------------------------- folder

N_GOOD = 20


def write_folder(root: Path) -> dict[str, str]:
    """20 readable images of mixed sizes, modes and formats, one corrupt and one empty file.

    Returns {relative path: expected caption}.
    """
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    specs = [
        ("a.png", "RGB", (40, 30)), ("b.jpg", "RGB", (20, 50)), ("c.JPEG", "RGB", (33, 33)),
        ("d.png", "RGBA", (24, 24)), ("e.png", "L", (30, 18)), ("f.gif", "P", (16, 40)),
        ("g.webp", "RGB", (28, 20)), ("h.bmp", "RGB", (17, 19)), ("i.jpg", "CMYK", (32, 24)),
        ("j.png", "I;16", (20, 20)), ("k.Png", "LA", (26, 22)), ("l.png", "RGB", (64, 16)),
        ("sub/m.png", "RGB", (30, 30)), ("sub/n.jpg", "RGB", (21, 31)), ("sub/o.png", "P", (25, 25)),
        ("sub/p.png", "RGB", (18, 36)), ("sub/deeper/q.png", "RGB", (40, 40)),
        ("sub/deeper/r.jpg", "L", (22, 26)), ("sub/deeper/s.webp", "RGBA", (19, 23)),
        ("sub/deeper/t.png", "RGB", (45, 15)),
    ]  # fmt: skip
    assert len(specs) == N_GOOD
    for name, mode, size in specs:
        if mode == "I;16":
            image = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
        else:
            rgb = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))
            image = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
        image.save(root / name)
    (root / "bad.png").write_bytes(b"this is not a png" * 10)
    (root / "sub" / "empty.jpg").write_bytes(b"")
    (root / "notes.md").write_text("not an image")
    (root / ".hidden" / "x.png").write_bytes(b"ignored")
    root_meta = [
        {"file_name": "a.png", "text": "caption a"},
        {"file_name": "b.jpg", "text": "caption b"},
        {"file_name": "sub/deeper/q.png", "text": "caption q"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in root_meta) + "\n\n")
    sub_meta = [
        {"file_name": "m.png", "text": "caption m"},
        {"file_name": "deeper/r.jpg", "text": "caption r"},
    ]
    (root / "sub" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in sub_meta))
    (root / "c.txt").write_text("caption c\n")
    (root / "sub" / "n.txt").write_text("caption n")
    captions: dict[str, str] = {}
    captioned = ["a.png", "b.jpg", "sub/deeper/q.png", "sub/m.png", "sub/deeper/r.jpg", "c.JPEG", "sub/n.jpg"]
    for name, *_ in specs:
        captions[name] = f"caption {Path(name).stem}" if name in captioned else ""
    return captions


@pytest.fixture()
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "images"
    root.mkdir()
    return root, write_folder(root)


def test_folder_scan_captions_and_skips(image_folder, caplog):
    root, captions = image_folder
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        ds = ImageFolderDataset(root, 16)
    assert len(ds) == N_GOOD
    found = {item.path.relative_to(root).as_posix(): item.caption for item in ds.items}
    assert found == captions
    assert [item.path for item in ds.items] == sorted(item.path for item in ds.items)
    skipped = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(skipped) == 1 and "skipped 2 unreadable" in skipped[0]
    assert "bad.png" in skipped[0] and "empty.jpg" in skipped[0]
    missing = [r.getMessage() for r in caplog.records if "no caption" in r.getMessage()]
    assert len(missing) == 1 and missing[0].startswith(f"13 of {N_GOOD} images")
    for i in range(len(ds)):
        assert_item(ds[i], 16)


def test_folder_decode_failure_uses_next_item(image_folder, caplog):
    root, _ = image_folder
    ds = ImageFolderDataset(root, 16)
    data = ds.items[0].path.read_bytes()
    ds.items[0].path.write_bytes(data[: len(data) // 3])  # header fine, pixels truncated
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        item = ds[0]
    assert item["caption"] == ds.items[1].caption
    warnings = [r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage()]
    assert len(warnings) == 1 and ds.items[0].path.name in warnings[0]


def test_folder_augmentation_reproducible(image_folder):
    root, _ = image_folder
    ds = ImageFolderDataset(root, 16, crop="random", flip=True)
    first = ds[(11, 1234)]["pixel_values"]
    assert torch.equal(first, ds[(11, 1234)]["pixel_values"])
    assert any(not torch.equal(first, ds[(11, s)]["pixel_values"]) for s in range(8))
    assert torch.equal(ds[11]["pixel_values"], ImageFolderDataset(root, 16)[11]["pixel_values"])


def test_folder_broken_metadata_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = ['{"file_name": "a.png", "text": "ok"}', "", '{"file_name": "b.png", "text": oops}']
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 3"):
        scan_folder(tmp_path)


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/etc/passwd"])
def test_folder_escaping_file_name_refused(tmp_path, name):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}))
    with pytest.raises(ValueError, match="outside the dataset folder"):
        scan_folder(tmp_path)


def test_folder_empty_or_missing(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images found under .*\.png, \.jpg"):
        ImageFolderDataset(tmp_path, 16)
    with pytest.raises(ValueError, match="no image folder"):
        ImageFolderDataset(tmp_path / "nope", 16)


def test_build_folder_splits_disjoint(image_folder):
    root, _ = image_folder
    cfg = DataConfig(dataset="folder", path=str(root), resolution=16, crop="random", flip=True)
    train, val = build_dataset(cfg, "train", seed=0), build_dataset(cfg, "val", seed=0)
    train_paths, val_paths = {i.path for i in train.items}, {i.path for i in val.items}
    assert len(val_paths) == max(1, N_GOOD // 10) and len(train_paths) == N_GOOD - len(val_paths)
    assert not train_paths & val_paths
    assert {i.path for i in build_dataset(cfg, "val", seed=0).items} == val_paths
    other = [{i.path for i in build_dataset(cfg, "val", seed=s).items} for s in range(1, 6)]
    assert any(o != val_paths for o in other)
    assert train.transform.crop == "random" and train.transform.flip
    assert val.transform.crop == "center" and not val.transform.flip
    assert_item(val[(0, 99)], 16)


def test_build_shapes():
    cfg = DataConfig(train_size=100, val_size=10, resolution=16, holdout=["red circle"])
    train, val = build_dataset(cfg, "train", seed=0), build_dataset(cfg, "val", seed=0)
    assert isinstance(train, ShapesDataset) and (len(train), len(val)) == (100, 10)
    assert train.flip and not val.flip and val.split == "val"
    assert_item(train[(0, 1)], 16)


# ----------------------------------------------------------------------------- datasets (hf)


def small_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    sizes = [(20, 20), (30, 18), (16, 40)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[k % 3][::-1], 3), dtype=np.uint8)) for k in range(n)]


def test_hf_saved_dataset_through_build(tmp_path):
    images = small_images(30)
    data = datasets.Dataset.from_dict({"image": images, "text": [f"item {k}" for k in range(30)]})
    data.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(dataset="hf", path=str(tmp_path / "saved"), resolution=16, crop="random")
    train, val = build_dataset(cfg, "train", seed=0), build_dataset(cfg, "val", seed=0)
    assert isinstance(train, HFImageDataset) and (len(train), len(val)) == (27, 3)
    train_caps = {train[i]["caption"] for i in range(len(train))}
    val_caps = {val[i]["caption"] for i in range(len(val))}
    assert not train_caps & val_caps and len(train_caps | val_caps) == 30
    assert_item(train[(4, 7)], 16)
    assert torch.equal(train[(4, 7)]["pixel_values"], train[(4, 7)]["pixel_values"])


def test_hf_dataset_dict_with_val_split(tmp_path):
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"img": small_images(12), "caption": ["t"] * 12}),
        test=datasets.Dataset.from_dict({"img": small_images(5), "caption": [["v1", "v2"]] * 5}),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    base = dict(dataset="hf", path=str(tmp_path / "dd"), resolution=16, image_column="img")
    cfg = DataConfig(**base, caption_column="caption", val_split="test", val_size=4)
    train, val = build_dataset(cfg, "train", seed=0), build_dataset(cfg, "val", seed=0)
    assert (len(train), len(val)) == (12, 4)
    assert val[0]["caption"] == "v1"  # a list of captions: the first without an aug seed
    assert {val[(0, s)]["caption"] for s in range(20)} == {"v1", "v2"}
    with pytest.raises(ValueError, match="no split 'nope'; splits: train, test"):
        build_dataset(DataConfig(**base, caption_column="caption", val_split="nope"), "val", seed=0)
    with pytest.raises(ValueError, match="available columns: img, caption"):
        build_dataset(DataConfig(**base), "train", seed=0)  # caption_column "text" is missing


def test_hf_cells_as_paths_and_bytes(tmp_path):
    images = small_images(4)
    paths = []
    for k, image in enumerate(images):
        paths.append(str(tmp_path / f"{k}.png"))
        image.save(paths[-1])
    by_path = HFImageDataset(datasets.Dataset.from_dict({"image": paths, "text": ["a"] * 4}), 16)
    cells = [{"bytes": encode(im).getvalue(), "path": None} for im in images]
    by_bytes = HFImageDataset(datasets.Dataset.from_dict({"image": cells, "text": [None] * 4}), 16)
    for k in range(4):
        assert torch.equal(by_path[k]["pixel_values"], by_bytes[k]["pixel_values"])
        assert torch.equal(by_path[k]["pixel_values"], ImageTransform(16)(images[k]))
    assert by_bytes[0]["caption"] == "" and by_path[0]["caption"] == "a"
    with pytest.raises(ValueError, match="available columns: image, text"):
        HFImageDataset(by_path.dataset, 16, image_column="pic")


def test_hf_streaming_shuffle_and_skip(tmp_path):
    data = datasets.Dataset.from_dict({"image": small_images(24), "text": [f"item {k}" for k in range(24)]})
    data.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(dataset="hf", path=str(tmp_path / "saved"), resolution=16, streaming=True, val_size=4)
    train, val = build_dataset(cfg, "train", seed=0), build_dataset(cfg, "val", seed=0)
    assert isinstance(train, HFStreamingDataset) and len(val) == 4
    items = list(train)
    train_caps = [it["caption"] for it in items]
    val_caps = {val[i]["caption"] for i in range(len(val))}
    assert len(items) == 20 and not set(train_caps) & val_caps
    assert train_caps != sorted(train_caps, key=lambda c: int(c.split()[1]))  # shuffled
    assert [it["caption"] for it in train] == train_caps  # same seed, same order
    train.skip = 7
    resumed = list(train)
    assert [it["caption"] for it in resumed] == train_caps[7:]
    for a, b in zip(resumed, items[7:], strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    train.set_epoch(1)
    train.skip = 0
    assert [it["caption"] for it in train] != train_caps


def write_tar_shards(folder: Path, shards: int, per_shard: int) -> None:
    """webdataset tar shards: <key>.png and <key>.txt per sample."""
    import tarfile

    k = 0
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for _ in range(per_shard):
                image = io.BytesIO()
                Image.fromarray(np.full((20, 24, 3), 10 * k, dtype=np.uint8)).save(image, "PNG")
                for name, data in (
                    (f"{k:05d}.png", image.getvalue()),
                    (f"{k:05d}.txt", f"item {k}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1


@pytest.mark.parametrize("shards", [3, 4])  # 4 shards split by shard, 3 by example
def test_streaming_tar_shards_split_across_ranks(tmp_path, shards):
    write_tar_shards(tmp_path, shards, per_shard=6)
    n = shards * 6
    cfg = DataConfig(dataset="hf", path=str(tmp_path), streaming=True, image_column="png", caption_column="txt",
                     resolution=16, val_size=0, shuffle_buffer=8)  # fmt: skip
    per_rank = []
    for rank in range(2):
        stream = build_dataset(cfg, "train", seed=0)
        assert isinstance(stream, HFStreamingDataset)
        stream.rank, stream.world_size = rank, 2
        items = list(stream)
        assert all(it["pixel_values"].shape == (3, 16, 16) for it in items)
        per_rank.append([it["caption"] for it in items])
    assert not set(per_rank[0]) & set(per_rank[1])  # disjoint
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"item {k}" for k in range(n))  # together: all
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 6


def test_export_folder_in_a_new_color_reads_back(tmp_path):
    import argparse

    from ldm.cli.export_folder import parse_color
    from ldm.data.export_folder import export_folder
    from ldm.eval.shapes_reader import caption_accuracy

    orange = parse_color("orange=240,140,30")
    assert orange == ("orange", (240, 140, 30))
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=R,G,B"):
        parse_color("orange")
    root = export_folder(tmp_path / "orange", count=12, color=orange)
    data = build_dataset(
        DataConfig(dataset="folder", path=str(root), val_size=0, flip=False), "train", seed=0
    )
    items = [data[i] for i in range(len(data))]
    assert all(it["caption"].startswith("an orange ") for it in items)
    images = torch.stack([it["pixel_values"] for it in items])
    result = caption_accuracy(
        images, [it["caption"] for it in items], colors={**COLORS, "orange": (240, 140, 30)}
    )
    assert result["accuracy"] == 1.0  # the evaluator reads the new color once its palette has it


def test_decompression_bombs_are_refused_and_counted(tmp_path, monkeypatch, caplog):
    from ldm.data.folder import scan_folder
    from ldm.data.transforms import ImageTooLargeError

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would only warn below 2x this
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1,600 pixels
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    with caplog.at_level(logging.WARNING):
        items = scan_folder(tmp_path)
    assert [it.path.name for it in items] == ["small.png"]
    assert "skipped 1 unreadable" in caplog.text and "decompression bomb" in caplog.text
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        load_rgb(tmp_path / "big.png")


def test_captions_that_are_not_utf8(tmp_path, caplog):
    from ldm.data.folder import read_metadata, scan_folder

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    with caplog.at_level(logging.WARNING):
        items = scan_folder(tmp_path)
    assert items[0].caption == "caf\ufffd au lait" and "not UTF-8" in caplog.text
    (tmp_path / "metadata.jsonl").write_bytes(
        b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png", "text": "\xe9"}\n'
    )
    with pytest.raises(ValueError, match="line 2: not UTF-8"):
        read_metadata(tmp_path / "metadata.jsonl")


def test_tiny_images_are_skipped_and_empty_captions_counted(tmp_path, caplog):
    from ldm.data.hf import decode_image
    from ldm.data.transforms import ImageTooSmallError

    for name, size in [("a.png", (32, 32)), ("b.png", (20, 24)), ("c.png", (24, 20)), ("pixel.gif", (1, 1)),
                       ("thin.png", (64, 4))]:  # fmt: skip
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
    lines = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "b.png", "text": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    (tmp_path / "c.txt").write_text("  \n")
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        items = scan_folder(tmp_path)
    assert [(i.path.name, i.caption) for i in items] == [
        ("a.png", "a red square"),
        ("b.png", ""),
        ("c.png", ""),
    ]
    messages = [r.getMessage() for r in caplog.records]
    skipped = [m for m in messages if m.startswith("skipped 2 unreadable or unusable")]
    assert len(skipped) == 1 and "1x1 pixels is too small" in skipped[0] and "64x4" in skipped[0]
    assert sum(m.startswith("2 of 3 images") and "empty" in m for m in messages) == 1
    with pytest.raises(ImageTooSmallError, match="at least 8"):
        decode_image(str(tmp_path / "pixel.gif"))  # how the hf source decodes: it skips the item
