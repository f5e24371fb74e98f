"""Buffers under capture and training follow eager PyTorch (issue 13.5): timm's BatchNormAct2d
counts its batches in Python (``num_batches_tracked.add_(1)``), which fx ran once while tracing
and never again."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn
from toys import kd_loss, sgd

import tspipe_fx
from tspipe_fx.runtime import ReferenceTrainer


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), BatchNormAct2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3), BatchNormAct2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.head(h.mean((2, 3)))


def buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in m.named_buffers()}


def test_capture_profile_and_compile_leave_the_buffers_alone() -> None:
    torch.manual_seed(0)
    model, x = Counting(), torch.randn(4, 3, 8, 8)
    before = buffers(model)
    cm = tspipe_fx.capture(model, (x,))
    assert cm.method == "fx"
    assert any(n.op == "call_method" and n.target == "add_" for n in cm.graph_module.graph.nodes)
    tspipe_fx.profile(model, (x,), repeats=1)
    tspipe_fx.compile(model, Counting().eval(), 2, example_inputs=(x,), cost_model="uniform")
    for name, value in buffers(model).items():
        torch.testing.assert_close(value, before[name], msg=name)


@pytest.mark.parametrize("mode", ["kd", "momentum"])
def test_every_buffer_follows_eager_training(mode: str) -> None:
    torch.manual_seed(0)
    student = Counting()
    teacher = Counting().eval() if mode == "kd" else copy.deepcopy(student)
    mine = copy.deepcopy(student)
    mine_teacher = copy.deepcopy(teacher)
    views = 1
    pipe = tspipe_fx.compile(mine, mine_teacher, 2, example_inputs=(torch.randn(8, 3, 8, 8),), mode=mode,
                             micro_batches=2, views=views, cost_model="uniform")  # fmt: skip

    def loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return kd_loss(s, t, y)

    trainer = pipe.trainer(loss, optimizer=sgd)
    ref = ReferenceTrainer(student, teacher, loss, optimizer=sgd, mode=mode, micro_batches=2, views=views)
    for _ in range(3):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
        trainer.step(x, target=y)
        ref.step(x, target=y)
    trainer.finish()
    for home, eager in ((mine, student), (mine_teacher, teacher)):
        got = dict(home.named_buffers())
        for name, value in eager.named_buffers():
            torch.testing.assert_close(got[name], value, msg=name)
    assert int(mine.bn1.num_batches_tracked) == 3 * 2  # once per micro-batch, as eager micro-batching


class BranchesOnABuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * 2 if self.scale > 1 else self.a(x)  # Python branches on a buffer's value


def test_a_model_branching_on_a_buffer_is_traced_with_its_buffers_as_constants() -> None:
    """Buffers are graph values under fx, so fx cannot branch on one; such a model is traced
    again with its buffers read as constants, which is safe as long as it writes none."""
    model, x = BranchesOnABuffer(), torch.randn(3, 8)
    cm = tspipe_fx.capture(model, (x,))
    assert cm.method == "fx"
    torch.testing.assert_close(cm(x), model(x))


class BranchesOnAndWritesBuffers(BranchesOnABuffer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scale.add_(1)  # a counter kept in Python
        return super().forward(x)


def test_known_limitation_a_model_reading_and_writing_buffers_in_python_is_refused_by_fx() -> None:
    """README, Limitations: fx can neither branch on a buffer nor trace without running its
    Python update once; export cannot branch on data either. The buffers stay as they were."""
    model, x = BranchesOnAndWritesBuffers(), torch.randn(3, 8)
    with pytest.raises(tspipe_fx.CaptureError, match=r"fx: CaptureError: BranchesOnAndWritesBuffers both reads a "
                                                      r"buffer's value in Python and writes buffers in Python \(scale\)"):  # fmt: skip
        tspipe_fx.capture(model, (x,))
    assert float(model.scale) == 2.0
