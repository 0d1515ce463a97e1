"""Typed configs: dataclasses loaded from YAML presets plus dotted ``key=value`` overrides.

Each run is one dataclass tree (``VAERunConfig`` for stage 1, ...). ``load_config`` starts
from its defaults, merges a YAML preset, then the command-line overrides, and checks
every key and type on the way: an unknown key or a value of the wrong type raises
``ConfigError`` naming the key and what is allowed. Then each dataclass checks its values in
``__post_init__``: choices with ``check_choice``, ranges with ``check_bounds`` and the class's
``BOUNDS`` table (``{"lr": "> 0", "ema_decay": "[0, 1)"}``), so a value that cannot work is
refused when the config is read, not steps into a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ldm.core.errors import ConfigError

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"config key '{name}' is {value!r}; allowed: {' | '.join(choices)}")


def _within(value: float, bound: str) -> bool:
    """Whether ``value`` meets ``bound``: ``"> 0"``, ``">= 1"``, or an interval ``"[0, 1)"``. NaN never does."""
    if bound[0] in "[(":
        low, high = (float(x) for x in bound[1:-1].split(","))
        above = low <= value if bound[0] == "[" else low < value
        below = value <= high if bound[-1] == "]" else value < high
        return above and below
    op, limit = bound.split()
    return value >= float(limit) if op == ">=" else value > float(limit)


def check_bounds(section: str, cfg: Any) -> None:
    """Raise ``ConfigError`` for the first field of ``cfg`` outside its bound in ``type(cfg).BOUNDS``.

    None (an unset optional key) passes; a list passes when each of its items does.
    """
    for name, bound in type(cfg).BOUNDS.items():
        value = getattr(cfg, name)
        items = value if isinstance(value, list) else [value]
        if not all(v is None or _within(v, bound) for v in items):
            allowed = f"in {bound}" if bound[0] in "[(" else bound
            raise ConfigError(f"config key '{section}.{name}' is {value}; it must be {allowed}")


ROLES = ("train", "regularization")


@dataclass
class SourceConfig:
    """One source of a concept dataset (``data.dataset=sources``, ``data.sources``): its images, how
    often an epoch walks them, its captions, and its role. ``train`` sources teach the concept;
    ``regularization`` sources are DreamBooth's class images (prior preservation), captioned by their
    own captions where they have them (drawn ones have their prompt), else ``class_prompt``; their
    loss is weighted by ``data.prior_loss_weight``."""

    def prompts(self) -> list[str]:
        """The prompts a regularization source's class images are drawn from, in turn."""
        return list(self.class_prompts) or [self.class_prompt]

    path: str | None = (
        None  # folder root (folder) or .csv file (csv); a regularization folder may not exist yet
    )
    dataset: str = "folder"  # folder | csv
    role: str = "train"  # train | regularization
    repeats: int = 1  # this source's items this many times an epoch
    # regularization: the caption of its images that have none, and the prompt the base model draws
    # missing class images from
    class_prompt: str | None = None
    # regularization: several prompts instead, drawn in turn (class image n: prompt n mod len), each
    # image captioned with its prompt (a class of many kinds; for the shapes demo, its captions)
    class_prompts: list[str] = field(default_factory=list)
    # regularization: the base model draws class images into `path` until it holds this many (0: none)
    num_class_images: int = 0
    caption_dropout: float | None = None  # this source's condition dropout; None: text.p_uncond
    prefix: str = ""  # added before this source's captions (a trigger word), after caption.prefix
    suffix: str = ""  # added after this source's captions, before caption.suffix
    caption_column: str = "text"  # caption key in metadata.jsonl (folder) or column (csv)
    image_column: str = "image"  # image file column, relative to the csv (csv)

    BOUNDS: ClassVar[dict[str, str]] = {
        "repeats": ">= 1",
        "num_class_images": ">= 0",
        "caption_dropout": "[0, 1)",
    }

    def __post_init__(self) -> None:
        check_choice("data.sources[].dataset", self.dataset, ("folder", "csv"))
        check_choice("data.sources[].role", self.role, ROLES)
        check_bounds("data.sources[]", self)
        if not self.path:
            raise ConfigError("a data.sources entry has no path: give each source path=DIR (or a .csv)")
        if self.role == "train" and (
            self.class_prompt is not None or self.class_prompts or self.num_class_images
        ):
            raise ConfigError(
                f"data.sources entry {self.path}: class_prompt(s) and num_class_images belong to a "
                "role=regularization source (DreamBooth's class images); add one with the class prompt, "
                "or remove them from this train source"
            )
        if self.role == "regularization":
            if not self.class_prompt and not self.class_prompts:
                raise ConfigError(
                    f"data.sources entry {self.path}: a role=regularization source needs class_prompt "
                    "(e.g. 'a photo of a dog'), the caption of its class images (or class_prompts: several)"
                )
            if self.dataset != "folder":
                raise ConfigError(
                    f"data.sources entry {self.path}: regularization sources are folders (dataset=folder)"
                )


def check_source_paths(sources: list[SourceConfig]) -> None:
    """Refuse a regularization folder that is, holds or lies inside a train source's folder: folders
    are read recursively, so class images would train as the subject's, or the subject's as class
    images."""
    for reg in (s for s in sources if s.role == "regularization"):
        r = Path(reg.path).resolve()
        for t in (s for s in sources if s.role == "train"):
            p = Path(t.path).resolve()
            p = p.parent if t.dataset == "csv" else p
            if r == p or p in r.parents or r in p.parents:
                raise ConfigError(
                    f"data.sources: the regularization folder {reg.path} and the train source {t.path} "
                    "overlap (folders are read with their subfolders); give the class images a folder of "
                    "their own, beside the subject's"
                )


@dataclass
class DataConfig:
    """Where images and captions come from, and how they become tensors."""

    dataset: str = "shapes"  # the names of ldm.data.build.DATA_SOURCES: shapes | folder | csv | hf
    path: str | None = (
        None  # folder root (folder), .csv file (csv), or datasets name / load_from_disk path (hf)
    )
    resolution: int = 32  # square side in pixels after resize and crop
    crop: str = "center"  # center | random
    flip: bool = True  # random horizontal flip (p = 0.5)
    val_size: int = 512  # validation items (folder/hf: at most a tenth of the data)
    num_workers: int = 0  # DataLoader worker processes
    repeats: int = 1  # walk the training items this many times per epoch (small datasets)
    buckets: bool = False  # aspect-ratio buckets of about resolution^2 pixels (folder, csv, hf)
    bucket_max_aspect: float = 2.0  # widest bucket: w/h (and h/w) at most this
    # folder, csv: per-pixel loss weights from each image's <stem>-masklabel.png or its alpha channel
    # (ldm.data.masks; images with neither count as all ones)
    masked_loss: bool = False
    # shapes only
    train_size: int = 50_000  # items in the training split
    holdout: list[str] = field(
        default_factory=list
    )  # "color shape" pairs kept out of training, e.g. "red circle"
    # folder, csv and hf
    caption_column: str = "text"  # caption key in metadata.jsonl (folder) or column (csv, hf)
    image_column: str = "image"  # image column (hf), or image file column, relative to the csv (csv)
    # hf only
    split: str = "train"  # split to train on
    val_split: str | None = None  # split to validate on (None: hold items out of `split`)
    streaming: bool = False  # iterate the dataset without downloading it whole
    shuffle_buffer: int = 1000  # streaming: items in the shuffle buffer (0 keeps the stream's order)
    # shapes, train split: half the items drawn up to this many pixels larger and cropped, a crop per
    # item (SDXL's micro-conditioning sees their original size and crop vary); 0: none
    crop_margin: int = 0
    # dataset=sources: several image sources in one run (SourceConfig: path, role, repeats, captions),
    # each counted in the log; regularization sources hold DreamBooth's class images
    sources: list[SourceConfig] = field(default_factory=list)
    prior_loss_weight: float = 1.0  # the loss weight of regularization items (DreamBooth's lambda)

    BOUNDS: ClassVar[dict[str, str]] = {
        "prior_loss_weight": ">= 0",
        "resolution": ">= 8",
        "val_size": ">= 0",
        "num_workers": ">= 0",
        "repeats": ">= 1",
        "bucket_max_aspect": ">= 1",
        "train_size": ">= 1",
        "shuffle_buffer": ">= 0",
        "crop_margin": ">= 0",
    }

    def __post_init__(self) -> None:
        # data.dataset is checked against ldm.data.build.DATA_SOURCES (the registry) by the run configs
        check_choice("data.crop", self.crop, ("center", "random"))
        check_bounds("data", self)
        if self.buckets and (self.dataset == "shapes" or self.streaming):
            raise ConfigError(
                "data.buckets=true needs images of many shapes from folder, csv or a map-style hf dataset "
                "(shapes images are square; streams cannot be measured ahead)"
            )
        if self.crop_margin and self.dataset != "shapes":
            raise ConfigError(
                "data.crop_margin applies to the shapes dataset; for images use data.crop=random or data.buckets"
            )
        if self.dataset == "sources" and not self.sources:
            raise ConfigError(
                "data.dataset=sources needs data.sources: a list of {path, role, repeats, ...} "
                "(see configs/ldm/dreambooth-lora.yaml)"
            )
        if self.sources and self.dataset != "sources":
            raise ConfigError(
                f"data.sources is set but data.dataset is {self.dataset}: set data.dataset=sources to train "
                "on them (and leave data.path unset), or remove data.sources"
            )
        if self.dataset == "sources":
            if self.path:
                raise ConfigError(
                    "data.dataset=sources reads each source's own path: leave data.path unset "
                    f"(it is {self.path}) or list it as a source"
                )
            if self.repeats > 1:
                raise ConfigError(
                    "data.repeats applies to one data.path; with data.sources give each source its repeats"
                )
            if self.streaming:
                raise ConfigError("data.streaming applies to hf datasets; data.sources are folders and CSVs")
            check_source_paths(self.sources)
            if not any(s.role == "train" for s in self.sources):
                raise ConfigError(
                    "data.sources has no role=train source: add the images of the concept to learn "
                    "(regularization sources alone teach nothing new)"
                )
        if self.masked_loss and self.dataset not in ("folder", "csv", "sources"):
            raise ConfigError(
                f"data.masked_loss=true reads mask files and alpha channels of image files: use data.dataset="
                f"folder or csv (not {self.dataset})"
            )
        if self.dataset in ("folder", "csv", "hf") and not self.path:
            raise ConfigError(f"data.dataset={self.dataset} needs data.path=PATH (the images to train on)")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping shared by both training programs."""

    batch_size: int = 32  # per process, per accumulation step
    max_steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    lr_schedule: str = "cosine"  # constant | cosine | linear (after warm-up)
    lr_warmup_steps: int = 100  # linear warm-up from 0
    min_lr_ratio: float = 0.0  # final lr / peak lr for cosine and linear
    # adamw | adafactor (factored second moments, no first: a fraction of AdamW's state) |
    # adamw8bit (bitsandbytes' 8-bit states; needs bitsandbytes and CUDA) | prodigy (estimates its own
    # step size: train.lr is a multiplier on it, 1.0; the prodigy extra) | schedulefree (AdamW without a
    # schedule: train.lr_schedule=constant; the schedulefree extra)
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    channels_last: bool = True  # memory format of conv weights and inputs
    tf32: bool = True  # CUDA: TF32 tensor cores for fp32 matmuls and convolutions (Ampere and newer)
    compile: bool = False  # torch.compile the trained network's forward for the loss (needs g++ on CPUs)
    max_nonfinite_steps: int = 10  # NaN/Inf-loss steps are skipped; this many in a row stop the run
    ema_decay: float = 0.0  # EMA of the weights; 0 disables
    log_every: int = 25  # steps between metrics.jsonl lines
    sample_every: int = 500  # steps between sample grids; 0 disables
    checkpoint_every: int = 500  # steps between resumable checkpoints; 0 disables
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    stop_at: int | None = None  # checkpoint and exit at this step (resume later with --resume latest)
    # a deterministic validation loss (val/loss, metrics.jsonl and trackers) every this many steps and
    # at the last step; 0 disables. Fixed held-out items, fixed noise (and for stage 2 timesteps
    # stratified over the schedule, val/loss_t* per quarter), the EMA weights when EMA is on
    val_every: int = 200
    val_items: int = 64  # held-out items it uses (the first of the validation split)
    val_timesteps: int = 4  # stage 2: noise levels per item (val_items x this entries)
    # entries per forward pass; None: batch_size. Keep it fixed to compare runs on other process counts
    val_batch_size: int | None = None
    # trackers (through accelerate) for the scalars and sample grids: none | tensorboard | wandb | all
    report_to: str = "none"

    BOUNDS: ClassVar[dict[str, str]] = {
        "batch_size": ">= 1",
        "max_steps": ">= 1",
        "lr": "> 0",
        "lr_warmup_steps": ">= 0",
        "min_lr_ratio": "[0, 1]",
        "adam_beta1": "[0, 1)",
        "adam_beta2": "[0, 1)",
        "weight_decay": ">= 0",
        "grad_clip": ">= 0",
        "gradient_accumulation_steps": ">= 1",
        "max_nonfinite_steps": ">= 1",
        "ema_decay": "[0, 1)",
        "log_every": ">= 1",
        "sample_every": ">= 0",
        "val_every": ">= 0",
        "val_items": ">= 1",
        "val_timesteps": ">= 1",
        "val_batch_size": ">= 1",
        "checkpoint_every": ">= 0",
        "keep_checkpoints": ">= 1",
        "stop_at": ">= 1",
    }

    def __post_init__(self) -> None:
        check_choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        if self.optimizer == "schedulefree" and self.lr_schedule != "constant":
            raise ConfigError(
                f"train.optimizer=schedulefree replaces the lr schedule (it averages its iterates): set "
                f"train.lr_schedule=constant (it is {self.lr_schedule}); train.lr_warmup_steps still warms up"
            )
        check_choice("train.report_to", self.report_to, ("none", "tensorboard", "wandb", "all"))
        check_bounds("train", self)


OPTIMIZERS = ("adamw", "adafactor", "adamw8bit", "prodigy", "schedulefree")


def _schema_keys(node: Any) -> list[str]:
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: DictConfig, merged: DictConfig | None = None) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        if node is None and merged is not None:  # inside a list item (data.sources[0]): the merged one
            node = OmegaConf.select(merged, parent)
        kind = getattr(err, "object_type", None)
        in_list = node is None or (not parent and kind is not OmegaConf.get_type(schema))
        if in_list and dataclasses.is_dataclass(kind):  # a list item's dataclass (a source)
            fields = ", ".join(sorted(f.name for f in dataclasses.fields(kind)))
            return f"unknown config key '{leaf}' in a {kind.__name__} entry; keys allowed there: {fields}"
        allowed = ", ".join(_schema_keys(node)) or "(none)"
        where = f"'{parent}'" if parent else "the top level"
        return f"unknown config key '{key}'; keys allowed at {where}: {allowed}"
    if isinstance(err, ValidationError):
        expected = OmegaConf.select(schema, key, throw_on_missing=False)
        kind = type(expected).__name__ if expected is not None else "the schema's type"
        msg = str(err).splitlines()[0]
        return f"config key '{key}' has a value of the wrong type ({msg}); expected {kind}"
    return f"config key '{key}': {str(err).splitlines()[0]}"


def load_config(schema: type[T], preset: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``schema`` <- YAML ``preset`` <- dotted ``key=value`` ``overrides``.

    Raises ``ConfigError`` for a missing preset, an unknown key or a wrong type.
    """
    base = OmegaConf.structured(schema)
    layers = []
    if preset is not None:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"no config file at {path}; presets are in {CONFIG_DIR}")
        layers.append(OmegaConf.load(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=200)")
    # a key through a list item (data.sources.0.path=DIR) updates that item, after the others
    indexed = [o for o in overrides or [] if any(part.isdigit() for part in o.split("=", 1)[0].split("."))]
    plain = [o for o in overrides or [] if o not in indexed]
    if plain:
        layers.append(OmegaConf.from_dotlist(plain))
    merged = None
    try:
        merged = OmegaConf.merge(base, *layers)
        for item in indexed:
            key = item.split("=", 1)[0]
            value = OmegaConf.select(OmegaConf.from_dotlist([f"value={item.split('=', 1)[1]}"]), "value")
            if OmegaConf.select(merged, key.rsplit(".", 1)[0], default=None) is None:
                raise ConfigError(
                    f"override {item!r}: there is no list item {key.rsplit('.', 1)[0]} to change"
                )
            OmegaConf.update(merged, key, value, merge=True)
        return OmegaConf.to_object(merged)  # runs each dataclass's __post_init__ checks
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, base, merged)) from None


def to_yaml(config: Any) -> str:
    """The config as YAML, the way it is saved in a run folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
