"""Data: the built-in shapes dataset, image folders, ``datasets`` datasets, and transforms.

Every map-style dataset here takes ``dataset[i]`` or ``dataset[(i, aug_seed)]`` and returns
``{"pixel_values": float32 (3, R, R) in [-1, 1], "caption": str}``.
"""

from ldm.data.build import build_dataset, split_indices
from ldm.data.folder import FolderItem, ImageFolderDataset, scan_folder
from ldm.data.hf import HFImageDataset, HFStreamingDataset, load_hf_dataset
from ldm.data.shapes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    ShapesDataset,
    ShapeSpec,
    allowed_combos,
    caption,
    render,
    shape_spec,
    shape_specs,
)
from ldm.data.transforms import ImageTransform, load_rgb, split_key, to_rgb

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "SHAPES",
    "FolderItem",
    "HFImageDataset",
    "HFStreamingDataset",
    "ImageFolderDataset",
    "ImageTransform",
    "ShapeSpec",
    "ShapesDataset",
    "allowed_combos",
    "build_dataset",
    "caption",
    "load_hf_dataset",
    "load_rgb",
    "render",
    "scan_folder",
    "shape_spec",
    "shape_specs",
    "split_indices",
    "split_key",
    "to_rgb",
]
