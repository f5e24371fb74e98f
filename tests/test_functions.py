"""Custom autograd Functions keep their backward through capture and training; capture leaves
nothing on the user's model (issue 13.7)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from toys import kd_loss, sgd

import tspipe_fx
from tspipe_fx import CaptureError, capture
from tspipe_fx.runtime import ReferenceTrainer


class GradReverse(torch.autograd.Function):
    """Identity forward, negated gradient (domain-adversarial training)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        return -g


class StraightThrough(torch.autograd.Function):
    """Rounding forward, identity gradient (quantisation-aware training)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        return g


class Custom(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.head(torch.relu(self.b(self.fn.apply(h * 3))))


class Caching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.last = h  # a cache of the last activation
        self.seen = h
        return h * torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize("fn", [GradReverse, StraightThrough])
def test_a_custom_backward_survives_capture(fn: type[torch.autograd.Function]) -> None:
    torch.manual_seed(0)
    model, x = Custom(fn), torch.randn(6, 8)
    cm = capture(model, (x,))
    assert cm.method == "fx"
    assert [n.target.__name__ for n in cm.graph_module.graph.nodes if n.op == "call_function" and
            "apply" in getattr(n.target, "__name__", "")] == [f"{fn.__name__}_apply"]  # fmt: skip
    eager = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    captured = torch.autograd.grad(cm(x).square().sum(), list(model.parameters()))
    for e, c in zip(eager, captured, strict=True):
        torch.testing.assert_close(c, e)
    plain = copy.deepcopy(model)
    plain.fn = type("Inlined", (), {"apply": staticmethod(lambda h: fn.forward(None, h))})
    inlined = torch.autograd.grad(plain(x).square().sum(), list(plain.parameters()))
    assert not torch.allclose(inlined[0], eager[0])  # the backward matters: the test can fail


def test_a_custom_backward_trains_across_stages_like_the_reference() -> None:
    torch.manual_seed(0)
    student, teacher = Custom(GradReverse), Custom(StraightThrough).eval()
    pipe = tspipe_fx.compile(copy.deepcopy(student), copy.deepcopy(teacher), 2, example_inputs=(torch.randn(8, 8),),
                             micro_batches=2, cost_model="uniform")  # fmt: skip
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    ref = ReferenceTrainer(student, teacher, kd_loss, optimizer=sgd, micro_batches=2)
    got, expected = [], []
    for _ in range(3):
        x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
        out = trainer.step(x, target=y)
        got += [out.loss] if out is not None else []
        expected.append(ref.step(x, target=y))
    got.append(trainer.finish().loss)
    assert got == pytest.approx(expected, rel=1e-5)


def test_export_refuses_a_custom_function_by_name() -> None:
    with pytest.raises(CaptureError, match=r"calls the custom autograd.Function .*GradReverse: torch.export"):
        capture(Custom(GradReverse), (torch.randn(6, 8),), method="export")


def test_capture_leaves_nothing_on_the_users_model() -> None:
    """fx left a Proxy on a module attribute (torch.save failed afterwards), and a tensor constant
    made while tracing was looked up on the user's model, so capture fell back to export."""

    model, x = Caching(), torch.randn(3, 8)
    cm = capture(model, (x,), method="fx")
    assert model.last is None and not hasattr(model, "seen")
    torch.save(model, io.BytesIO())
    torch.testing.assert_close(cm(x), model(x))
    assert not any(k.startswith("_tensor_constant") for k in vars(model)["_buffers"])
