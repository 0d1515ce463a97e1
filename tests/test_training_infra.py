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


def test_one_pass_ema_equals_diffusers_ema():
    import torch
    from diffusers.training_utils import EMAModel

    from ldm.training.ema import EMA

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    params[1].requires_grad_(False)  # frozen parameters are copied, as diffusers does
    ours, theirs = EMA(params, decay=0.99), EMAModel(params, decay=0.99, foreach=True)
    for _ in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ours.step(params)
        theirs.step(params)
    for a, b in zip(ours.shadow_params, theirs.shadow_params, strict=True):
        torch.testing.assert_close(a, b)
    assert ours.cur_decay_value == theirs.cur_decay_value  # the same warm-up of the decay


def test_clip_gradients_matches_torch_and_skips_only_a_no_op():
    import torch
    from accelerate import Accelerator

    from ldm.training.optim import clip_gradients

    accelerator = Accelerator(cpu=True)
    for scale in (1e-3, 10.0):  # below and above max_norm
        torch.manual_seed(0)
        ours = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
        ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        for a, b in zip(ours, ref, strict=True):
            a.grad = torch.randn_like(a) * scale
            b.grad = a.grad.clone()
        norm = clip_gradients(accelerator, ours, 1.0)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, 1.0))
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a.grad, b.grad)


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run():
    import torch

    from ldm.training.nonfinite import NonFiniteGuard, NonFiniteLossError
    from ldm.training.optim import adamw

    p = torch.nn.Parameter(torch.ones(3))
    optimizer = adamw([p], 0.1, (0.9, 0.999), 0.0)
    guard = NonFiniteGuard(max_consecutive=3, device=torch.device("cpu"))
    for loss in (torch.tensor(float("nan")), torch.tensor(float("inf"))):
        p.grad = torch.full_like(p, float("nan"))
        guard.step(optimizer, loss)
        assert torch.equal(p.data, torch.ones(3))  # skipped: weights stay finite and unchanged
    assert guard.check() == 2
    p.grad = torch.ones(3)
    guard.step(optimizer, torch.tensor(1.0))
    assert p.data.lt(1).all() and guard.check() == 0  # a good step updates and resets the run
    for _ in range(3):
        p.grad = torch.ones(3)
        guard.step(optimizer, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        guard.check()

    class Accumulating:  # as accelerate's wrapper: steps only when gradients are synchronised
        def __init__(self, inner):
            self.optimizer, self.sync = inner, False

        def step(self):
            if self.sync:
                self.optimizer.step()

    wrapped = Accumulating(optimizer)
    guard = NonFiniteGuard(max_consecutive=3, device=torch.device("cpu"))
    before = p.data.clone()
    guard.step(wrapped, torch.tensor(float("nan")), sync=False)  # a bad micro-batch spoils the update
    wrapped.sync = True
    guard.step(wrapped, torch.tensor(1.0), sync=True)
    assert torch.equal(p.data, before) and guard.check() == 1
