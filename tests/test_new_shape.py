"""A shape no dataset item has (``NEW_SHAPES``: the cross), drawn by the export tool and read back."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from ldm.cli.export_folder import main as export_main
from ldm.data.shapes import render, shape_specs
from ldm.eval.shapes_reader import caption_accuracy, classify_batch


def crosses(n, resolution):
    specs = [
        dataclasses.replace(s, shape="cross", cy=min(max(s.cy, s.size / 2), 1 - s.size / 2))
        for s in shape_specs(0, "val", range(n))
    ]
    return specs, render(specs, resolution)


@pytest.mark.parametrize("resolution", [32, 64])
def test_the_reader_reads_its_own_crosses_and_no_cross_elsewhere(resolution):
    specs, images = crosses(200, resolution)
    captions = [f"a {s.color} cross on a {s.background} background" for s in specs]
    assert caption_accuracy(images, captions, new_shapes=("cross",))["accuracy"] >= 0.99
    blurred = torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1, count_include_pad=False).round().byte()
    assert caption_accuracy(blurred, captions, new_shapes=("cross",))["shape"] >= 0.99
    assert all(label[1] == "none" for label in classify_batch(images))  # unknown to the plain reader
    plain = shape_specs(0, "val", range(100))  # the dataset's shapes never read as a cross
    labels = classify_batch(render(plain, resolution), new_shapes=("cross",))
    assert (
        np.mean([label == (s.color, s.shape, s.background) for label, s in zip(labels, plain, strict=True)])
        >= 0.99
    )


def test_the_export_tool_draws_the_new_shape_captioned_with_a_token(tmp_path):
    assert export_main([str(tmp_path / "c"), "--count", "8", "--shape", "cross", "--word", "<cross>"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "c" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(" <cross> on a " in r["text"] for r in rows)
    from PIL import Image

    images = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(tmp_path / "c" / r["file_name"]))).permute(2, 0, 1)
            for r in rows
        ]
    )
    truth = [r["text"].replace("<cross>", "cross") for r in rows]
    assert caption_accuracy(images, truth, new_shapes=("cross",))["accuracy"] == 1.0
