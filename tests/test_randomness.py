"""Dropout and drop-path draw by their identity (seed, model, batch, view, micro-batch, ordinal):
the same masks in the reference trainer, on 2 and 3 stages, under every runtime and schedule."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import Noisy, byol_loss, kd_loss, sgd
from toys import run_batches as _run

import tspipe_fx
from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.randomness import SeededDraws, derive_seed, draw_counts
from tspipe_fx.runtime.reference import ReferenceTrainer


def test_derived_seeds_are_stable_and_apart() -> None:
    seeds = {derive_seed(0, m, b, v, k, o) for m in (0, 1) for b in range(4) for v in (0, 1) for k in range(4)
             for o in range(4)}  # fmt: skip
    assert len(seeds) == 2 * 4 * 2 * 4 * 4
    assert derive_seed(3, 1, 2) == derive_seed(3, 1, 2) < 2**63


def test_a_draw_depends_on_its_identity_only_and_leaves_the_callers_generator() -> None:
    x = torch.ones(1000)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with SeededDraws(0, 0, 5, 1, 2) as mode:
        a = F.dropout(x, 0.5)
        b = F.dropout(x, 0.5)  # the next ordinal: another mask
    assert torch.equal(torch.get_rng_state(), before)
    assert mode.next == 2 and not torch.equal(a, b)
    with SeededDraws(0, 0, 5, 1, 2):
        assert torch.equal(F.dropout(x, 0.5), a)
    with SeededDraws(0, 0, 5, 1, 2, start=1):  # a later stage starts where the earlier stopped
        assert torch.equal(F.dropout(x, 0.5), b)
    with SeededDraws(0, 0, 6, 1, 2):
        assert not torch.equal(F.dropout(x, 0.5), a)


def test_a_draw_nested_in_another_operation_is_seen() -> None:
    mha = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True)
    x = torch.randn(2, 5, 16)
    with SeededDraws(0, 0, 0, 0, 0) as mode:
        first = mha(x, x, x)[0]
    assert mode.next == 1
    with SeededDraws(0, 0, 0, 0, 0):
        assert torch.equal(mha(x, x, x)[0], first)


def test_attention_draws_only_with_dropout() -> None:
    q = torch.randn(2, 2, 5, 8)
    with SeededDraws(0, 0, 0, 0, 0) as mode:
        F.scaled_dot_product_attention(q, q, q)  # CPU's fused kernel is tagged as drawing
    assert mode.next == 0
    with SeededDraws(0, 0, 0, 0, 0) as mode:
        first = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    with SeededDraws(0, 0, 0, 0, 0):
        assert torch.equal(F.scaled_dot_product_attention(q, q, q, dropout_p=0.5), first)
    assert mode.next == 1


def test_stage_draw_counts_come_from_a_fake_run() -> None:
    pipe = tspipe_fx.compile(Noisy(), Noisy(), 3, example_inputs=(torch.randn(8, 8),), mode="momentum",
                             cost_model="uniform")  # fmt: skip
    stages = pipe.staged("student").stages
    x = torch.randn(8, 8)
    before = torch.get_rng_state()
    counts = draw_counts(stages, [x])
    assert sum(counts) == 3 and len(counts) == 3  # nn.Dropout, the drop-path's bernoulli_, F.dropout
    assert torch.equal(torch.get_rng_state(), before)


def _kd(n: int, schedule: str, steps: int = 5, **options: Any) -> tuple[list[float], list[float], Any, Any]:
    torch.manual_seed(0)
    student, teacher = Noisy(), Noisy(32).eval()
    pipe = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), n, example_inputs=(torch.randn(8, 8),),
                             cost_model="uniform")  # fmt: skip
    trainer = pipe.trainer(kd_loss, optimizer=sgd, schedule=schedule, **options)
    ref = ReferenceTrainer(copy.deepcopy(student), copy.deepcopy(teacher), kd_loss, optimizer=sgd,
                           micro_major=trainer.micro_major, loss=trainer.loss,
                           **{**options, "micro_batches": trainer.m})  # fmt: skip
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(steps)]
    got = _run(trainer, [(x, {"target": y}) for x, y in data])
    want = [ref.step(x, target=y) for x, y in data]
    return got, want, trainer, ref


@pytest.mark.parametrize(("n", "schedule"), [(2, "tspipe"), (3, "tspipe"), (3, "auto"), (2, "1f1b")])
def test_dropout_and_drop_path_equal_the_reference(n: int, schedule: str) -> None:
    got, want, trainer, ref = _kd(n, schedule)
    per_micro = trainer.loss != "batch"  # terms summed in another order: fp32 rounding
    tol = {"rel": 1e-4, "abs": 1e-5} if per_micro else {"rel": 1e-6, "abs": 1e-7}
    assert got == pytest.approx(want, **tol)
    trained = Noisy()
    trainer.sync_to_modules(student=trained)
    for (name, a), b in zip(trained.state_dict().items(), ref.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=tol["rel"] * 10, atol=tol["abs"] * 10, msg=name)


def test_the_masks_are_the_seeds() -> None:
    got, _, _, _ = _kd(2, "tspipe", micro_batches=4)
    again, _, _, _ = _kd(3, "tspipe", micro_batches=4)  # other stages and devices, the same draws
    other, _, _, _ = _kd(2, "tspipe", micro_batches=4, seed=1)
    assert again == pytest.approx(got, rel=1e-6)
    assert other != pytest.approx(got, rel=1e-3)


@pytest.mark.parametrize("n", [2, 3])
def test_a_momentum_teacher_in_train_mode_draws_its_own_masks(n: int) -> None:
    torch.manual_seed(0)
    online = Noisy(16, 8)
    target = copy.deepcopy(online)
    pipe = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), n, example_inputs=(torch.randn(8, 8),),
                             mode="momentum", cost_model="uniform")  # fmt: skip
    trainer = pipe.trainer(byol_loss, optimizer=sgd, views=2, momentum=0.9)
    ref = ReferenceTrainer(copy.deepcopy(online), copy.deepcopy(target), byol_loss, optimizer=sgd, mode="momentum",
                           micro_batches=trainer.m, views=2, momentum=0.9)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)) for _ in range(4)]
    assert _run(trainer, batches) == pytest.approx([ref.step(*b) for b in batches], rel=1e-5, abs=1e-6)


class Flaky(nn.Module):
    """Draws once, then twice, then once...: randomness that changes between forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        for _ in range(1 + (self.calls + 1) % 2):
            x = F.dropout(x, 0.1)
        return self.lin(x)


def test_randomness_that_changes_between_forwards_is_refused() -> None:
    x = torch.randn(8, 8)
    student = tspipe_fx.capture(nn.Sequential(nn.Linear(8, 8), Flaky(), nn.Linear(8, 4)), (x,), leaf_modules=(Flaky,))
    pipe = tspipe_fx.compile(student, Noisy(16).eval(), 2, example_inputs=(x,), cost_model="uniform")
    trainer = pipe.trainer(kd_loss, optimizer=sgd, schedule="sequential", micro_batches=1)
    with pytest.raises(TspipeError, match="random operations where its first forward ran 1"):
        for _ in range(3):
            trainer.step(torch.randn(8, 8), target=torch.randint(0, 4, (8,)))


def test_a_bad_seed_is_named() -> None:
    with pytest.raises(TspipeError, match="seed must be an integer >= 0, got -1"):
        ReferenceTrainer(nn.Linear(8, 4), nn.Linear(8, 4), kd_loss, optimizer=sgd, seed=-1)
