"""The pixel-based shapes evaluator: accuracy on rendered validation images, robustness, edge cases."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.data import shapes
from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, ShapesDataset, ShapeSpec, caption, render
from ldm.eval.shapes_reader import (
    NONE,
    caption_accuracy,
    classify,
    classify_batch,
    parse_caption,
    read_batch,
)

ORANGE = (240, 140, 30)
PURPLE = (128, 0, 128)
BROWN = (139, 69, 19)


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


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) through a real JPEG encoder (4:2:0 chroma) and back."""
    out = []
    for array in x.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def _scale(x: torch.Tensor, spread: float, generator: torch.Generator) -> torch.Tensor:
    """Float (B, 3, H, W) scaled about the centre by 1 +- ``spread`` (uniform), each axis on its own."""
    factors = 1 + spread * (2 * torch.rand(len(x), 2, generator=generator) - 1)
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / factors[:, 0], 1 / factors[:, 1]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _draw(inside, resolution: int, color, background, supersample: int = 4) -> torch.Tensor:
    """uint8 (3, R, R) of the region ``inside(x, y)`` (coordinates in fractions of the image,
    y down), anti-aliased by supersampling, in ``color`` over ``background`` (r, g, b)."""
    t = (np.arange(resolution * supersample) + 0.5) / (resolution * supersample)
    x, y = np.broadcast_arrays(t[None, :], t[:, None])
    coverage = inside(x, y).reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))
    fg = np.asarray(color, dtype=np.float64)[:, None, None]
    bg = np.asarray(background, dtype=np.float64)[:, None, None]
    return torch.from_numpy(np.rint(fg * coverage + bg * (1 - coverage)).astype(np.uint8))


def _polygon(vertices):
    """``inside`` of a polygon (even-odd rule, so stars work too)."""

    def inside(x, y):
        result = np.zeros(x.shape, dtype=bool)
        for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
            crosses = (y1 > y) != (y2 > y)
            with np.errstate(divide="ignore", invalid="ignore"):
                result ^= crosses & (x < x1 + (y - y1) * (x2 - x1) / (y2 - y1))
        return result

    return inside


def _ill_fitting(kind: str, r: float, cx: float, cy: float, turn: float):
    """``inside`` of a shape that is none of circle, square and upward triangle, of "radius"
    ``r`` (half its extent) at (cx, cy), turned by ``turn`` radians where it has no fixed pose."""

    def ring_of(n, radii):
        angles = turn + 2 * np.pi * np.arange(n) / n
        radii = np.resize(np.asarray(radii, dtype=np.float64), n)
        return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)

    if kind == "ellipse 3:2":
        c, s = math.cos(turn), math.sin(turn)
        return lambda x, y: (
            (((x - cx) * c + (y - cy) * s) / r) ** 2 + ((-(x - cx) * s + (y - cy) * c) / (r / 1.5)) ** 2 <= 1
        )
    if kind == "pentagon":
        return _polygon(ring_of(5, r))
    if kind == "hexagon":
        return _polygon(ring_of(6, r))
    if kind == "star":  # five points, inner radius 0.45 x the outer
        return _polygon(ring_of(10, [r, 0.45 * r]))
    if kind == "cross":  # plus sign, arms a third of its extent wide
        w = r / 3
        return lambda x, y: (
            ((abs(x - cx) <= r) & (abs(y - cy) <= w)) | ((abs(x - cx) <= w) & (abs(y - cy) <= r))
        )
    if kind == "rounded square":  # corner radius half the half side
        k = r / 2

        def rounded(x, y):
            dx, dy = np.maximum(abs(x - cx) - (r - k), 0), np.maximum(abs(y - cy) - (r - k), 0)
            return (abs(x - cx) <= r) & (abs(y - cy) <= r) & (dx * dx + dy * dy <= k * k)

        return rounded
    if kind == "downward triangle":
        h = r * math.sqrt(3)  # equilateral, width 2r
        return _polygon(np.array([(cx - r, cy - h / 2), (cx + r, cy - h / 2), (cx, cy + h / 2)]))
    if kind == "ring":  # inner radius half the outer
        return lambda x, y: (
            ((x - cx) ** 2 + (y - cy) ** 2 <= r * r) & ((x - cx) ** 2 + (y - cy) ** 2 >= (r / 2) ** 2)
        )
    raise ValueError(kind)


def _pair(first: ShapeSpec, second: ShapeSpec, resolution: int) -> torch.Tensor:
    """Both shapes (on ``first``'s background) in one image; they must not overlap."""
    a, b = render([first, second], resolution)
    bg = torch.tensor(BACKGROUNDS[first.background], dtype=torch.int16)[:, None, None]
    return (a.short() + b.short() - bg).clamp(0, 255).to(torch.uint8)


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


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize(
    "first, second",
    [
        (("red", "circle", 0.4, 0.25, 0.5), ("blue", "square", 0.4, 0.75, 0.5)),  # the audit's image
        (("blue", "square", 0.55, 0.32, 0.32), ("yellow", "triangle", 0.35, 0.8, 0.8)),  # a smaller second
        (("green", "triangle", 0.45, 0.25, 0.3), ("magenta", "circle", 0.4, 0.7, 0.72)),
        (("cyan", "circle", 0.4, 0.3, 0.5), ("red", "square", 0.4, 0.7, 0.5)),  # touching
    ],
)
@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_two_shapes_of_different_colors_read_none(resolution, first, second, background):
    image = _pair(
        ShapeSpec(*first[:2], background, *first[2:]),
        ShapeSpec(*second[:2], background, *second[2:]),
        resolution,
    )
    assert classify(image) == (NONE, NONE, background)


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize(
    "first, second",
    [
        (("circle", 0.4, 0.25, 0.5), ("circle", 0.4, 0.75, 0.5)),
        (("square", 0.4, 0.25, 0.3), ("triangle", 0.4, 0.72, 0.72)),
        # second blob under MAX_SECOND_BLOB of the first: caught as stray foreground
        (("square", 0.6, 0.32, 0.32), ("triangle", 0.35, 0.8, 0.8)),
    ],
)
def test_two_separated_shapes_of_one_color_read_none(resolution, first, second):
    for color, background in [("red", "black"), ("yellow", "gray"), ("blue", "white")]:
        image = _pair(
            ShapeSpec(color, first[0], background, *first[1:]),
            ShapeSpec(color, second[0], background, *second[1:]),
            resolution,
        )
        assert classify(image) == (NONE, NONE, background)


@pytest.mark.parametrize(
    "kind",
    ["ellipse 3:2", "pentagon", "hexagon", "star", "cross", "rounded square", "downward triangle", "ring"],
)
def test_ill_fitting_shape_reads_none(kind):
    """Each at random sizes (the dataset's extents, 35-70% of the side), positions, turns, colors
    and backgrounds: the shape is none of the three, the color and background are still read."""
    rng = np.random.default_rng(sum(map(ord, kind)))
    for resolution in (32, 64):
        for _ in range(12):
            r = rng.uniform(0.175, 0.35)
            cx, cy = rng.uniform(r, 1 - r, size=2)
            color, background = rng.choice(list(COLORS)), rng.choice(list(BACKGROUNDS))
            inside = _ill_fitting(kind, r, cx, cy, rng.uniform(0, 2 * np.pi))
            image = _draw(inside, resolution, COLORS[color], BACKGROUNDS[background])
            assert classify(image) == (color, NONE, background), (kind, resolution, r, cx, cy)


@pytest.mark.parametrize(
    "rgb, color", [((200, 100, 50), "cyan"), ((60, 60, 200), "yellow"), ((200, 200, 120), "blue")]
)
def test_off_palette_background_reads_none(rgb, color):
    spec = ShapeSpec(color, "circle", "black", 0.5, 0.45, 0.55)
    inside = lambda x, y: (x - spec.cx) ** 2 + (y - spec.cy) ** 2 <= (spec.size / 2) ** 2  # noqa: E731
    image = _draw(inside, 32, COLORS[color], rgb)
    assert classify(image) == (color, "circle", NONE)
    assert classify(_draw(lambda x, y: x < 0, 32, COLORS[color], rgb)) == (NONE, NONE, NONE)  # blank
    assert classify(image, backgrounds={**BACKGROUNDS, "new": rgb}) == (color, "circle", "new")


@pytest.mark.parametrize("name, rgb", [("orange", ORANGE), ("purple", PURPLE), ("brown", BROWN)])
def test_off_palette_color_reads_none(name, rgb):
    extended = {**COLORS, name: rgb}
    for shape, background in [("square", "gray"), ("circle", "black"), ("triangle", "white")]:
        spec = ShapeSpec(name, shape, background, 0.5, 0.5, 0.5)
        image = render([spec], 32, colors=extended)[0]
        assert classify(image) == (NONE, shape, background)
        assert classify(image, colors=extended) == (name, shape, background)


def _degrade(name: str, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = images.float()
    if name == "blur":  # [1, 4, 6, 4, 1] / 16, sigma 1 px
        x = _blur(_blur(x))
    elif name == "noise":
        x = x + torch.randn(x.shape, generator=g) * 16.0
    elif name == "jpeg":
        x = _jpeg(images, 75).float()
    elif name == "rescale":  # down to half the size and back
        h = x.shape[-1]
        x = F.interpolate(x, size=(h // 2, h // 2), mode="bilinear", antialias=True, align_corners=False)
        x = F.interpolate(x, size=(h, h), mode="bilinear", align_corners=False)
    elif name == "scale":
        x = _scale(x, 0.07, g)
    elif name == "mix":  # a sample of a good model: slightly irregular, soft, noisy, off-color, compressed
        x = _blur(_warp(x, 0.5, g))
        x = x + torch.randn(len(x), 3, 1, 1, generator=g) * 6.0 + torch.randn(x.shape, generator=g) * 6.0
        x = _jpeg(x.clamp(0, 255).round().to(torch.uint8), 75).float()
    return x.clamp(0, 255).round().to(torch.uint8)


@pytest.mark.parametrize(
    "name, resolution",
    [("blur", 32), ("noise", 32), ("jpeg", 32), ("rescale", 32), ("scale", 32), ("mix", 32), ("mix", 64)],
)
def test_degraded_validation_images_read_right(name, resolution):
    """Degraded the ways generated samples are, the validation images still read right >= 99%."""
    images, captions = _val(resolution)
    result = caption_accuracy(_degrade(name, images, torch.Generator().manual_seed(3)), captions)
    assert result["accuracy"] >= 0.99, result


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
