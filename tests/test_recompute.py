"""Activation recompute: the same losses, weights and BatchNorm statistics as without it, with
the forward's dropout masks replayed, on every schedule (the split backward too)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from test_runtime import WritesItsInput
from torch import nn
from toys import Net, Noisy, kd_loss, sgd
from toys import run_batches as _run

import tspipe_fx
from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.recompute import recomputes
from tspipe_fx.runtime.reference import ReferenceTrainer


class NoisyNet(nn.Module):
    """BatchNorm (statistics that must move once) and dropout (masks that must replay)."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.noisy = Net(16, 8), Noisy(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.noisy(self.net(x))


def _train(n: int, schedule: str, recompute: str, model: type[nn.Module] = NoisyNet,
           **options: Any) -> tuple[list[float], dict[str, torch.Tensor], Any]:  # fmt: skip
    torch.manual_seed(0)
    student, teacher = model(), model().eval()
    pipe = tspipe_fx.compile(student, teacher, n, example_inputs=(torch.randn(8, 8),), cost_model="uniform")
    trainer = pipe.trainer(kd_loss, optimizer=sgd, schedule=schedule, recompute=recompute, **options)
    calls = [0] * n
    for d in trainer.runtime.devices:  # each stage forward, first runs and replays alike

        def counted(*args: Any, j: int = d.index, forward: Any = d.student.forward) -> Any:
            calls[j] += 1
            return forward(*args)

        d.student.forward = counted
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    losses = _run(trainer, [(x, {"target": y}) for x, y in data])
    return losses, dict(student.state_dict()), (trainer, calls)


@pytest.mark.parametrize(("n", "schedule"), [(2, "tspipe"), (3, "1f1b"), (3, "auto")])
@pytest.mark.parametrize("recompute", ["always", "except_last"])
def test_recompute_changes_nothing_but_the_work(n: int, schedule: str, recompute: str) -> None:
    want, weights, _ = _train(n, schedule, "never")
    got, trained, (trainer, calls) = _train(n, schedule, recompute)
    assert got == want  # bit for bit: the replay computes what the first run did
    for name, value in weights.items():  # the weights, and BatchNorm statistics updated once
        assert torch.equal(trained[name], value), name
    assert trainer.schedules[3].split_backward == (schedule == "auto")  # auto chose the split here
    m = trainer.m
    replays = sum(recomputes(recompute, micro, m) for micro in range(m))
    # Four batches: each micro-batch once, and once more where replayed (a split backward's two
    # halves share one replay).
    assert calls == [4 * (m + replays)] * n


def test_recompute_equals_the_reference() -> None:
    torch.manual_seed(0)
    student, teacher = NoisyNet(), NoisyNet().eval()
    ref = ReferenceTrainer(copy.deepcopy(student), copy.deepcopy(teacher), kd_loss, optimizer=sgd, micro_batches=2,
                           recompute="always")  # fmt: skip
    got, _, _ = _train(2, "tspipe", "always")
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    assert got == pytest.approx([ref.step(x, target=y) for x, y in data], rel=1e-6, abs=1e-7)


def test_a_stage_that_writes_its_input_replays_from_the_value_it_saw() -> None:
    want, weights, _ = _train(2, "tspipe", "never", WritesItsInput)
    got, trained, _ = _train(2, "tspipe", "always", WritesItsInput)
    assert got == want
    for name, value in weights.items():
        assert torch.equal(trained[name], value), name


def test_except_last_keeps_the_last_micro_batch() -> None:
    assert [recomputes("except_last", m, 4) for m in range(4)] == [True, True, True, False]
    assert not any(recomputes("never", m, 4) for m in range(4))
    assert all(recomputes("always", m, 4) for m in range(4))


def test_a_bad_recompute_is_named_with_the_choices() -> None:
    with pytest.raises(TspipeError, match=r"recompute must be one of \['never', 'always', 'except_last'\], got 'yes'"):
        ReferenceTrainer(Net(), Net(), kd_loss, optimizer=sgd, recompute="yes")
