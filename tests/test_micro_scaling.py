"""Micro-batch scaling, measured: what a sample costs at each micro-batch, and compile's choice
of M on it under ``refine``."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from torch import nn
from toys import Net

import tspipe_fx
import tspipe_fx.compiler.micro_batches as micro_batches
from tspipe_fx import TspipeError
from tspipe_fx.cost.micro_scaling import Scaling, measured_scaling


class PerCall(nn.Module):
    """A fixed 20 ms a call whatever the batch: its samples cost 4x as much at 2 as at 8."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        time.sleep(0.02)
        return (self.lin(x),)


def test_measured_scaling_charges_small_micro_batches_what_they_cost() -> None:
    student, teacher = PerCall(), PerCall()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(8, 8)
    got = measured_scaling(student, teacher, lambda b: ([x[:b]], [x[:b]]), 8, [2, 8], "cpu", repeats=3)
    assert got[8] == Scaling(1.0, 1.0, 1.0)
    assert 2.5 < got[2].student_fwd < 6.0 and 2.5 < got[2].teacher_fwd < 6.0  # 4x, were it exact
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())


def test_measured_scaling_rejects_bad_sizes() -> None:
    with pytest.raises(TspipeError, match=r"sizes >= 1, got 5, 8, \[0\]"):
        measured_scaling(PerCall(), PerCall(), lambda b: ([], []), 8, [0], "cpu")


@pytest.fixture(scope="module")
def profiles() -> tuple[tspipe_fx.Profile, tspipe_fx.Profile]:
    """Measured once: every compile of a test chooses on the same costs."""
    x = (torch.randn(16, 8),)
    return tspipe_fx.profile(Net(), x, repeats=1), tspipe_fx.profile(Net().eval(), x, repeats=1)


def _compile(refine: int, profiles: tuple[tspipe_fx.Profile, tspipe_fx.Profile]) -> tspipe_fx.Pipeline:
    torch.manual_seed(0)
    return tspipe_fx.compile(Net(), Net().eval(), 2, example_inputs=(torch.randn(16, 8),), refine=refine,
                             profile=profiles)  # fmt: skip


def test_compile_chooses_m_on_the_measured_scaling(monkeypatch: pytest.MonkeyPatch, profiles: tuple) -> None:  # type: ignore[type-arg]
    """Candidates 2, 4 and 8 of a batch of 16: a sample charged 10x in micro-batches below 8, as
    if measured so, and compile takes 2 micro-batches; charged 10x at 8, any M but 2."""
    asked: list[tuple[int, list[int]]] = []

    def charged(dear: Callable[[int], bool]) -> Callable[..., dict[int, Scaling]]:
        def measured(
            s: object, t: object, inputs_at: object, base: int, sizes: list[int], *a: object
        ) -> dict[int, Scaling]:
            asked.append((base, list(sizes)))
            return {b: Scaling(10.0, 10.0, 10.0) if dear(b) else Scaling(1.0, 1.0, 1.0) for b in sizes}

        return measured

    monkeypatch.setattr(micro_batches, "measured_scaling", charged(lambda b: b < 8))
    assert _compile(1, profiles).plan.micro_batches == 2
    monkeypatch.setattr(micro_batches, "measured_scaling", charged(lambda b: b >= 8))
    assert _compile(1, profiles).plan.micro_batches in (4, 8)
    assert asked == [(16, [2, 4, 8])] * 2  # the example batch, and each candidate's micro-batch


def test_scaling_is_measured_only_under_refine_and_on_profiles(
    monkeypatch: pytest.MonkeyPatch, profiles: tuple
) -> None:  # type: ignore[type-arg]
    def refused(*a: object, **k: object) -> dict:  # type: ignore[type-arg]
        raise AssertionError("measured without refine")

    monkeypatch.setattr(micro_batches, "measured_scaling", refused)
    _compile(0, profiles)
    tspipe_fx.compile(
        Net(), Net().eval(), 2, example_inputs=(torch.randn(16, 8),), refine=1, cost_model="uniform"
    )
    captured = tspipe_fx.capture(Net(), (torch.randn(16, 8),))
    captured.dynamic_batch = False  # an export held to its example batch: nothing to measure at others
    assert micro_batches.measured_at((captured, captured), ([], []), 16, [2, 4], torch.device("cpu")) == {}
