"""The pixel-based shapes evaluator: accuracy on rendered validation images, robustness, edge cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.data import shapes
from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, ShapesDataset, ShapeSpec, caption, render
from ldm.shapes_eval import (
    NONE,
    caption_accuracy,
    classify,
    classify_batch,
    parse_caption,
    read_batch,
)

ORANGE = (240, 140, 30)


def _val(resolution: int, size: int = 1000) -> tuple[torch.Tensor, list[str]]:
    ds = ShapesDataset(size, resolution, split="val")
    return ds.render_all(), [spec.caption for spec in ds.specs()]


def _blur(x: torch.Tensor) -> torch.Tensor:
    """[1, 2, 1] / 4 blur of float (B, 3, H, W), edges replicated."""
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3).contiguous()
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def _warp(x: torch.Tensor, pixels: float, generator: torch.Generator) -> torch.Tensor:
    """Smooth random distortion of float (B, 3, H, W) by about ``pixels`` pixels."""
    b, _, h, w = x.shape
    disp = torch.randn(b, 2, 4, 4, generator=generator) * pixels * 2 / h
    disp = F.interpolate(disp, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xx, yy], dim=-1)[None] + disp
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


@pytest.mark.parametrize("resolution", [32, 64])
def test_clean_validation_accuracy(resolution):
    images, captions = _val(resolution)
    result = caption_accuracy(images, captions)
    assert result["n"] == 1000
    assert result["accuracy"] >= 0.99, result
    for key in ("color", "shape", "background"):
        assert result[key] >= result["accuracy"]


@pytest.mark.parametrize("resolution", [32, 64])
def test_noise_and_blur(resolution):
    images, captions = _val(resolution)
    g = torch.Generator().manual_seed(0)
    x = _blur(images.float()) + torch.randn(images.shape, generator=g) * 8.0  # sigma 8/255
    x = (x / 127.5 - 1.0).clamp(-1, 1)  # float path, [-1, 1]
    result = caption_accuracy(x, captions)
    assert result["accuracy"] >= 0.95, result


def test_color_drift_distortion_and_softness():
    """Closer to a generator's output: shapes slightly irregular, soft edges, colors off."""
    images, captions = _val(32)
    g = torch.Generator().manual_seed(1)
    x = _warp(images.float(), 0.7, g)
    x = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    x = x + torch.randn(len(x), 3, 1, 1, generator=g) * 10.0 + torch.randn(x.shape, generator=g) * 8.0
    result = caption_accuracy(x.clamp(0, 255).round().to(torch.uint8), captions)
    assert result["accuracy"] >= 0.95, result


def test_input_formats_agree():
    ds = ShapesDataset(24, 32, split="val")
    images = ds.render_all()
    expected = [(s.color, s.shape, s.background) for s in ds.specs()]
    floats = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])  # [-1, 1]
    hwc = images.permute(0, 2, 3, 1).numpy()
    assert classify_batch(images) == expected
    assert classify_batch(floats) == expected
    assert classify_batch(floats.half()) == expected
    assert classify_batch(hwc) == expected
    assert classify_batch([Image.fromarray(a) for a in hwc]) == expected
    assert classify_batch(list(images)) == expected
    assert classify(images[0]) == expected[0]
    assert classify(images[:1]) == expected[0]
    assert classify(Image.fromarray(hwc[1])) == expected[1]
    assert classify(floats[2].numpy()) == expected[2]
    # mixed sizes in one list
    big = ShapesDataset(24, 64, split="val").render_all()
    assert classify_batch([images[3], big[3]]) == [expected[3], expected[3]]
    assert classify_batch(images[:0]) == []
    with pytest.raises(ValueError):
        classify(torch.zeros(4, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError):
        classify("not an image")


@pytest.mark.parametrize("noise", [0.0, 8.0])
def test_blank_image_is_never_correct(noise):
    all_captions = [caption(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS]
    g = torch.Generator().manual_seed(2)
    for name, rgb in BACKGROUNDS.items():
        blank = torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, 32, 32)
        blank = (blank + torch.randn(3, 32, 32, generator=g) * noise).clamp(0, 255).round().to(torch.uint8)
        color, shape, background = classify(blank)
        assert (color, shape) == (NONE, NONE)
        assert background == name
        result = caption_accuracy(blank.expand(len(all_captions), 3, 32, 32), all_captions)
        assert result["accuracy"] == 0.0
        assert result["shape"] == 0.0 and result["color"] == 0.0


def test_not_one_shape_reads_none():
    a = render([ShapeSpec("red", "circle", "black", 0.4, 0.25, 0.5)], 32)[0]
    b = render([ShapeSpec("red", "square", "black", 0.4, 0.75, 0.5)], 32)[0]
    assert classify(torch.maximum(a, b))[1] == NONE  # two shapes
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ellipse = (((yy - 16) / 5) ** 2 + ((xx - 16) / 12) ** 2 <= 1).float()
    image = (ellipse[None] * torch.tensor([30.0, 200.0, 30.0])[:, None, None]).to(torch.uint8)
    assert classify(image)[1] == NONE  # elongated
    white = (ellipse[None] * 255).to(torch.uint8).expand(3, 32, 32)
    assert classify(white)[0] == NONE  # no palette color
    # a small speck elsewhere does not matter
    c = render([ShapeSpec("blue", "triangle", "white", 0.5, 0.5, 0.55)], 32)[0].clone()
    c[:, 2:4, 2:4] = 0
    assert classify(c) == ("blue", "triangle", "white")


def test_reading_measurements():
    ds = ShapesDataset(30, 64, split="val")
    for reading, spec in zip(read_batch(ds.render_all()), ds.specs(), strict=True):
        assert reading.label == (spec.color, spec.shape, spec.background)
        assert reading.errors[spec.shape] < 0.05
        assert min(v for k, v in reading.errors.items() if k != spec.shape) > 0.1
        side = spec.size * 64
        true_area = {"circle": math.pi / 4, "square": 1.0, "triangle": math.sqrt(3) / 4}[spec.shape] * side**2
        assert reading.area == pytest.approx(true_area, rel=0.03)
        assert np.allclose(reading.foreground_rgb, COLORS[spec.color], atol=1)
        assert np.allclose(reading.background_rgb, BACKGROUNDS[spec.background], atol=1)


def test_extended_palette(monkeypatch):
    spec = ShapeSpec("orange", "square", "gray", 0.5, 0.5, 0.5)
    with monkeypatch.context() as m:
        m.setitem(shapes.COLORS, "orange", ORANGE)
        image = render([spec], 32)[0]
    assert "orange" not in COLORS
    extended = {**COLORS, "orange": ORANGE}
    assert classify(image, colors=extended) == ("orange", "square", "gray")
    assert classify(image)[0] != "orange"
    result = caption_accuracy(image[None], [spec.caption], colors=extended)
    assert result["accuracy"] == 1.0 and result["n"] == 1
    with pytest.raises(ValueError, match="orange"):
        caption_accuracy(image[None], [spec.caption])  # orange outside the default palette
    # the background palette extends the same way
    backgrounds = {**BACKGROUNDS, "navy": (0, 0, 90)}
    navy = torch.tensor([0, 0, 90], dtype=torch.uint8)[:, None, None].expand(3, 32, 32).clone()
    navy[:, 8:20, 8:20] = torch.tensor(COLORS["yellow"], dtype=torch.uint8)[:, None, None]
    assert classify(navy, backgrounds=backgrounds) == ("yellow", "square", "navy")


def test_parse_caption_round_trip_and_errors():
    for c in COLORS:
        for s in SHAPES:
            for b in BACKGROUNDS:
                assert parse_caption(caption(c, s, b)) == (c, s, b)
                assert parse_caption(caption(c, s, b), COLORS, BACKGROUNDS) == (c, s, b)
    assert parse_caption("  A Red  Circle on a Black background. ") == ("red", "circle", "black")
    assert parse_caption("an orange triangle on a white background") == ("orange", "triangle", "white")
    assert parse_caption("a light blue square on a dark gray background") == (
        "light blue",
        "square",
        "dark gray",
    )
    for bad in [
        "",
        "red circle",
        "a red circle",
        "a red circle on black",
        "a red circle on a black",
        "the red circle on a black background",
        "a red hexagon on a black background",
        "a circle on a black background",
        "a red circle on a black background with stars",
    ]:
        with pytest.raises(ValueError):
            parse_caption(bad)
    with pytest.raises(ValueError, match="orange"):
        parse_caption("an orange circle on a black background", colors=COLORS)
    with pytest.raises(ValueError, match="navy"):
        parse_caption("a red circle on a navy background", backgrounds=BACKGROUNDS)


def test_caption_accuracy_counts_and_errors():
    images, captions = _val(32, 12)
    wrong = list(captions)
    c, s, b = parse_caption(wrong[0])
    wrong[0] = caption(next(x for x in COLORS if x != c), s, b)
    c, s, b = parse_caption(wrong[1])
    wrong[1] = caption(c, next(x for x in SHAPES if x != s), b)
    result = caption_accuracy(images, wrong)
    assert result == {"accuracy": 10 / 12, "color": 11 / 12, "shape": 11 / 12, "background": 1.0, "n": 12}
    with pytest.raises(ValueError):
        caption_accuracy(images, captions[:-1])
    empty = caption_accuracy(images[:0], [])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"])
