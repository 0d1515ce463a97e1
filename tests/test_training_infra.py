"""Shared training infrastructure: lr schedule, data order, checkpoint files."""

import itertools
import math

import pytest

from ldm.training.checkpoint import resolve_checkpoint
from ldm.training.sampler import ResumableSampler
from ldm.training.schedule import lr_multiplier


def test_lr_schedule_warmup_then_cosine():
    assert lr_multiplier(0, 10, 110, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 110, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(60, 10, 110, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(110, 10, 110, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(60, 10, 110, "linear") == pytest.approx(0.5)
    assert lr_multiplier(1000, 10, 110, "constant") == 1.0
    assert all(math.isfinite(lr_multiplier(s, 0, 1, "cosine")) for s in range(3))


def test_sampler_resumes_mid_epoch_and_covers_every_item():
    full = list(itertools.islice(iter(ResumableSampler(10, seed=3)), 35))
    resumed = list(itertools.islice(iter(ResumableSampler(10, seed=3, start=17)), 18))
    assert resumed == full[17:]
    assert sorted(i for i, _ in full[:10]) == list(range(10))
    assert [i for i, _ in full[:10]] != [i for i, _ in full[10:20]]  # a new permutation each epoch
    assert len({s for _, s in full}) == len(full)  # every position has its own augmentation seed


def test_sampler_ranks_interleave_the_global_order():
    full = list(itertools.islice(iter(ResumableSampler(10, seed=1)), 20))
    r0 = list(itertools.islice(iter(ResumableSampler(10, seed=1, rank=0, num_replicas=2)), 10))
    r1 = list(itertools.islice(iter(ResumableSampler(10, seed=1, rank=1, num_replicas=2)), 10))
    assert r0 == full[0::2] and r1 == full[1::2]


def test_resume_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run without --resume"):
        resolve_checkpoint(tmp_path, "latest")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path, str(tmp_path / "half"))
