"""The latent cache on disk (``cache_dir``): the same items and the same training as in memory, any
shapes, a killed caching run that resumes to the same cache, resident memory that does not grow with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_autoencoder
from test_ldm_train import tiny as tiny_ldm

from ldm.core.config import DataConfig
from ldm.data import build_dataset
from ldm.data.cache import encode_dataset
from ldm.data.disk_cache import INDEX, DiskLatentDataset, build_disk_cache, shard_name
from ldm.train.diffusion import train_ldm
from ldm.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "model"
    tiny_autoencoder(scaling_factor=0.8).save_pretrained(folder)
    return folder


def test_disk_items_equal_the_in_memory_ones(tmp_path):
    vae = tiny_autoencoder(1.0).eval()
    data = build_dataset(DataConfig(resolution=16, train_size=37, val_size=4), "train", 0)
    memory = encode_dataset(vae, data, 8)
    build_disk_cache(vae, data, 8, tmp_path / "c", "k", per_shard=10)  # 4 shards, the last of 7
    disk = DiskLatentDataset(tmp_path / "c")
    assert len(disk) == 37 and sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == [
        shard_name(s) for s in range(4)
    ]
    for i in (0, 9, 10, 36):
        a, b = memory[i], disk[i]
        assert (
            torch.equal(a["mean"], b["mean"])
            and torch.equal(a["std"], b["std"])
            and a["caption"] == b["caption"]
        )
        assert torch.equal(a["original_size"], b["original_size"]) and torch.equal(
            a["crop_top_left"], b["crop_top_left"]
        )
    assert list(disk.captions) == memory.captions


def test_buckets_keep_their_shapes_on_disk(tmp_path, mixed_folder):
    vae = tiny_autoencoder(1.0).eval()
    cfg = DataConfig(
        dataset="folder", path=str(mixed_folder), resolution=48, buckets=True, val_size=0, flip=False
    )
    data = build_dataset(cfg, "train", 0, bucket_step=16)
    memory = encode_dataset(vae, data, 4)
    build_disk_cache(vae, data, 4, tmp_path / "c", "k", per_shard=5)
    disk = DiskLatentDataset(tmp_path / "c", data.bucket_of)
    assert len({tuple(disk[i]["mean"].shape) for i in range(len(disk))}) > 1
    for i in range(len(disk)):  # (encoded in other batches than in memory: equal to float rounding)
        torch.testing.assert_close(disk[i]["mean"], memory[i]["mean"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(disk[i]["std"], memory[i]["std"], rtol=1e-4, atol=1e-5)


def test_training_on_the_disk_cache_equals_the_in_memory_cache(tmp_path, vae_folder):
    memory = train_ldm(tiny_ldm(tmp_path / "memory", vae_folder, "eval.num_samples=0"))
    disk = train_ldm(
        tiny_ldm(
            tmp_path / "disk",
            vae_folder,
            "eval.num_samples=0",
            f"cache_dir={tmp_path / 'cache'}",
            "cache_shard_items=24",
        )  # fmt: skip
    )
    a = [r["train/loss"] for r in read_metrics(memory / "metrics.jsonl")]
    b = [r["train/loss"] for r in read_metrics(disk / "metrics.jsonl")]
    assert len(a) == len(b) == 6  # the same batches; latents encoded in other batches: float rounding
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b, strict=True)), (a, b)
    (folder,) = (tmp_path / "cache").glob("latents-*")
    assert json.loads((folder / INDEX).read_text())["items"] == 64
    again = train_ldm(  # a second run reads the cache, encodes nothing
        tiny_ldm(
            tmp_path / "again",
            vae_folder,
            "eval.num_samples=0",
            f"cache_dir={tmp_path / 'cache'}",
            "cache_shard_items=24",
        )  # fmt: skip
    )
    assert [r["train/loss"] for r in read_metrics(again / "metrics.jsonl")] == b


def cache_command(vae_folder, cache_dir: Path, items: int) -> list[str]:
    return [sys.executable, "-m", "ldm.cli.cache", f"vae={vae_folder}", "data.resolution=16",
            f"data.train_size={items}", "data.val_size=8", "unet.block_out_channels=[32,32]",
            "unet.norm_num_groups=8", "text.hidden_size=32", "text.num_heads=2", "text.intermediate_size=64",
            f"cache_dir={cache_dir}", "cache_shard_items=16"]  # fmt: skip


def test_a_killed_caching_run_resumes_to_the_same_cache(tmp_path, vae_folder):
    items = 3000
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cache_command(vae_folder, tmp_path / "killed", items), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "killed").glob("latents-*/shard-*"))) < 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (folder,) = (tmp_path / "killed").glob("latents-*")
    written = len(list(folder.glob("shard-*")))
    assert not (folder / INDEX).exists() and 5 <= written < -(-items // 16)  # killed part-way
    done = subprocess.run(cache_command(vae_folder, tmp_path / "killed", items), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    whole = subprocess.run(cache_command(vae_folder, tmp_path / "whole", items), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-2000:]
    (reference,) = (tmp_path / "whole").glob("latents-*")
    assert folder.name == reference.name
    names = sorted(p.name for p in reference.glob("shard-*"))
    assert names == sorted(p.name for p in folder.glob("shard-*")) and len(names) == -(-items // 16)
    for name in names:  # byte for byte
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(folder.glob(".*.tmp"))


def test_two_processes_write_the_cache_one_process_writes(tmp_path, vae_folder):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ldm.cli.cache"]  # fmt: skip
    two = subprocess.run([*launch, *cache_command(vae_folder, tmp_path / "two", 200)[3:]], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(cache_command(vae_folder, tmp_path / "one", 200), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    (a,) = (tmp_path / "two").glob("latents-*")
    (b,) = (tmp_path / "one").glob("latents-*")
    names = sorted(p.name for p in b.glob("shard-*"))
    assert len(names) == 13 and names == sorted(p.name for p in a.glob("shard-*"))
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert json.loads((a / INDEX).read_text()) == json.loads((b / INDEX).read_text())


def test_a_shard_cut_short_is_encoded_again(tmp_path):
    vae = tiny_autoencoder(1.0).eval()
    data = build_dataset(DataConfig(resolution=16, train_size=20, val_size=4), "train", 0)
    build_disk_cache(vae, data, 8, tmp_path / "c", "k", per_shard=10)
    whole = (tmp_path / "c" / shard_name(1)).read_bytes()
    (tmp_path / "c" / INDEX).unlink()  # as after a crash that renamed the shard before its data was on disk
    (tmp_path / "c" / shard_name(1)).write_bytes(whole[: len(whole) // 2])
    build_disk_cache(vae, data, 8, tmp_path / "c", "k", per_shard=10)
    assert (tmp_path / "c" / shard_name(1)).read_bytes() == whole


def test_any_caption_text_comes_back(tmp_path):
    from ldm.data.disk_cache import shard_columns, write_shard

    captions = ["a red circle", "", "ünïcödé ✓", "lone surrogate \ud83d"]
    mean = torch.randn(4, 2, 3, 3)
    micro = {"original_size": torch.full((4, 2), 6), "crop_top_left": torch.zeros(4, 2, dtype=torch.long)}
    write_shard(tmp_path / shard_name(0), shard_columns(mean, mean.exp(), captions, micro))
    entry = {"file": shard_name(0), "start": 0, "items": 4}
    (tmp_path / INDEX).write_text(json.dumps({"items": 4, "shards": [entry]}))
    disk = DiskLatentDataset(tmp_path)
    assert [disk[i]["caption"] for i in range(4)] == captions
    assert torch.equal(disk[3]["mean"], mean[3]) and torch.equal(disk[3]["std"], mean[3].exp())


def test_frozen_text_on_disk_trains_as_the_in_memory_text_cache(tmp_path, vae_folder, caplog):
    """text.train=false with cache_dir: every item's conditioning is cached on disk (one row per item,
    condition dropout to the "" row) and training equals the in-memory caption cache."""
    frozen = ["eval.num_samples=0", "text.train=false", "text.p_uncond=0.5"]  # dropout in most batches
    memory = train_ldm(tiny_ldm(tmp_path / "memory", vae_folder, *frozen))
    disk_args = [*frozen, f"cache_dir={tmp_path / 'cache'}", "cache_shard_items=24"]
    with caplog.at_level("INFO", logger="ldm"):
        disk = train_ldm(tiny_ldm(tmp_path / "disk", vae_folder, *disk_args))
    assert "64 items' conditioning" in caplog.text
    (folder,) = (tmp_path / "cache").glob("text-*")
    assert json.loads((folder / INDEX).read_text())["items"] == 64
    a = [r["train/loss"] for r in read_metrics(memory / "metrics.jsonl")]
    b = [r["train/loss"] for r in read_metrics(disk / "metrics.jsonl")]
    assert len(a) == len(b) == 6
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b, strict=True)), (a, b)
    # the text cache's rows are the conditioner's own outputs for each item's caption
    items = DiskLatentDataset(next((tmp_path / "cache").glob("latents-*")))
    from ldm.data.text_disk_cache import DiskTextColumns
    from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

    items.text = DiskTextColumns(folder)
    pipe = LatentDiffusionPipeline.from_pretrained(disk / "model")
    with torch.no_grad():
        ids = pipe.tokenizer(
            [items[5]["caption"]],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            return_tensors="pt",
        )
        context = pipe.text_encoder(ids.input_ids).last_hidden_state[0]
    assert torch.allclose(items[5]["text.encoder_hidden_states"], context, atol=1e-5)


def test_cached_conditions_give_the_empty_captions_row_where_dropout_dropped():
    from ldm.train.data import cached_conditions

    rows = torch.arange(6.0).view(3, 2, 1).expand(3, 2, 4)
    batch = {"caption": ["a", "", "c"], "text.encoder_hidden_states": rows}
    null = {"encoder_hidden_states": torch.full((1, 2, 4), -1.0)}
    cond = cached_conditions(batch, null, torch.device("cpu"))(["", "", "c"])["encoder_hidden_states"]
    assert torch.equal(cond[0], null["encoder_hidden_states"][0])  # "a" dropped: the "" row
    assert torch.equal(cond[1], rows[1])  # the caption was "" already: its own row
    assert torch.equal(cond[2], rows[2])


def test_sdxl_frozen_text_on_disk_holds_context_and_pooled(tmp_path, vae_folder):
    from test_sdxl_train import SCRATCH_XL

    from ldm.core.config import load_config
    from ldm.data.disk_cache import ShardReader
    from ldm.train.config import LDMRunConfig

    args = [f"vae={vae_folder}", *SCRATCH_XL, "eval.num_samples=0", "text.train=false", "text_2.train=false",
            "text.p_uncond=0.5"]  # fmt: skip
    runs = {}
    for name, extra in (("memory", []), ("disk", [f"cache_dir={tmp_path / 'cache'}"])):
        cfg = load_config(LDMRunConfig, None, [f"output_dir={tmp_path / name}", *args, *extra])
        runs[name] = [r["train/loss"] for r in read_metrics(train_ldm(cfg) / "metrics.jsonl")]
    assert len(runs["disk"]) == 4
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(runs["memory"], runs["disk"], strict=True)), runs
    (folder,) = (tmp_path / "cache").glob("text-*")
    columns = ShardReader(folder / shard_name(0)).columns
    assert set(columns) == {"encoder_hidden_states", "text_embeds"}
    assert columns["encoder_hidden_states"][1] == [
        64,
        16,
        64,
    ]  # both encoders' (16, 32) contexts side by side


class Stream(torch.utils.data.IterableDataset):
    """A stream as ``HFStreamingDataset`` is one: ``rank``, ``world_size``, ``skip`` (rows of this
    process's stream), ``set_epoch``, and each item's ``stream_position``; rows i, i + P, ... of
    ``data`` for process i. Rows in ``bad`` fail to decode (skipped, as the real stream does);
    ``fail_after`` items, then an error (a crash)."""

    def __init__(self, data, fail_after: int | None = None, bad: frozenset = frozenset()):
        self.data, self.fail_after, self.bad = data, fail_after, bad
        self.rank, self.world_size, self.skip = 0, 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rows = range(self.rank, len(self.data), self.world_size)
        yielded = 0
        for position in range(self.skip, len(rows)):
            if rows[position] in self.bad:
                continue
            if self.fail_after is not None and yielded == self.fail_after:
                raise RuntimeError("killed")
            yielded += 1
            yield {**self.data[rows[position]], "stream_position": position}


def test_a_stream_is_cached_shard_by_shard_and_a_crashed_run_resumes_to_the_same_cache(tmp_path):
    from ldm.data.disk_cache import build_stream_cache

    vae = tiny_autoencoder(1.0).eval()
    data = build_dataset(DataConfig(resolution=16, train_size=37, val_size=4), "train", 0)
    whole = build_stream_cache(vae, Stream(data), 8, tmp_path / "whole", "k", per_shard=10)
    disk = DiskLatentDataset(whole)
    memory = encode_dataset(vae, data, 8)
    assert len(disk) == 37 and [disk[i]["caption"] for i in range(37)] == memory.captions
    assert torch.equal(disk[36]["mean"], memory[36]["mean"])
    bad = frozenset({3, 12})  # two rows that do not decode: 35 items, rows and items apart
    whole = build_stream_cache(vae, Stream(data, bad=bad), 8, tmp_path / "bad", "k", per_shard=10)
    with pytest.raises(RuntimeError, match="killed"):  # dies in its third shard
        build_stream_cache(vae, Stream(data, 25, bad), 8, tmp_path / "again", "k", per_shard=10)
    assert sorted(p.name for p in (tmp_path / "again").glob("shard-*")) == [shard_name(0), shard_name(1)]
    again = build_stream_cache(vae, Stream(data, bad=bad), 8, tmp_path / "again", "k", per_shard=10)
    assert len(DiskLatentDataset(again)) == 35
    for name in [shard_name(s) for s in range(4)] + [INDEX]:
        assert (again / name).read_bytes() == (whole / name).read_bytes(), name


def test_two_processes_cache_their_parts_of_a_stream(tmp_path):
    """Process r's run c of items is shard c P + r; once both are done, the index lists them all."""
    import threading

    from ldm.data.disk_cache import build_stream_cache

    vae = tiny_autoencoder(1.0).eval()
    data = build_dataset(DataConfig(resolution=16, train_size=25, val_size=4), "train", 0)
    barrier = threading.Barrier(2)
    errors = []

    def process(rank: int) -> None:
        try:
            build_stream_cache(vae, Stream(data), 4, tmp_path / "c", "k", 5, rank, 2, barrier.wait)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    disk = DiskLatentDataset(tmp_path / "c")
    assert len(disk) == 25  # rank 0: 13 items (shards 0, 2, 4), rank 1: 12 (shards 1, 3, 5)
    assert sorted(disk[i]["caption"] for i in range(25)) == sorted(data[i]["caption"] for i in range(25))
    index = json.loads((tmp_path / "c" / INDEX).read_text())
    assert [s["items"] for s in index["shards"]] == [5, 5, 5, 5, 3, 2]


def test_training_from_a_stream_caches_it_once_and_reads_the_cache(tmp_path, vae_folder):
    import datasets
    from PIL import Image

    shapes = build_dataset(DataConfig(resolution=16, train_size=40, val_size=4), "train", 0)
    images = [
        Image.fromarray(((shapes[i]["pixel_values"].permute(1, 2, 0) + 1) * 127.5).byte().numpy())
        for i in range(40)
    ]
    datasets.Dataset.from_dict(
        {"image": images, "text": [shapes[i]["caption"] for i in range(40)]}
    ).save_to_disk(tmp_path / "hf")
    stream = ["data.dataset=hf", f"data.path={tmp_path / 'hf'}", "data.streaming=true", "data.val_size=4",
              "data.shuffle_buffer=0", f"cache_dir={tmp_path / 'cache'}", "cache_shard_items=16", "eval.num_samples=0"]  # fmt: skip
    out = train_ldm(tiny_ldm(tmp_path / "run", vae_folder, *stream))
    (folder,) = (tmp_path / "cache").glob("latents-*")
    index = json.loads((folder / INDEX).read_text())
    assert index["items"] == 36 and [s["items"] for s in index["shards"]] == [
        16,
        16,
        4,
    ]  # 40 less the 4 held out
    assert len(read_metrics(out / "metrics.jsonl")) == 6
    again = train_ldm(tiny_ldm(tmp_path / "again", vae_folder, *stream))  # reads the cache: the same run
    assert [r["train/loss"] for r in read_metrics(again / "metrics.jsonl")] == [
        r["train/loss"] for r in read_metrics(out / "metrics.jsonl")
    ]
