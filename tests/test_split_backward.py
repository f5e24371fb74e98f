"""The backward in two halves gives the gradients of one backward, each computed once."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tspipe_fx.runtime.split_backward import input_gradients, weight_gradients


class Block(nn.Module):
    """Weights on the input path (linears, a norm), a weight added on it (a position embedding),
    one reached from the output only (a bias of its own), a skip and a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 6)
        self.norm, self.bn = nn.LayerNorm(6), nn.BatchNorm1d(6)
        self.pos = nn.Parameter(torch.randn(6))
        self.alone = nn.Parameter(torch.randn(6))
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x + self.pos)
        y = self.bn(self.b(torch.relu(self.a(h))) + h)
        return y * 2, y.sum(-1) + (self.alone * self.alone).sum()


@pytest.mark.parametrize("inputs_need_grad", [True, False])
def test_two_halves_equal_one_backward(inputs_need_grad: bool) -> None:
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(5, 6, requires_grad=inputs_need_grad)
    grads = [torch.randn(5, 6), torch.randn(5)]
    out = block(x)
    torch.autograd.backward(out, grads)
    want = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    want_x = x.grad.clone() if inputs_need_grad else None
    block.zero_grad(set_to_none=True)
    x.grad = None

    out = block(x)
    params = list(block.parameters())
    dx, work = input_gradients(out, grads, [x], params)
    early = {n for n, p in block.named_parameters() if p.grad is not None}
    if inputs_need_grad:  # the vectors on the input path (norms' and linears' vectors, pos) now
        assert early == {"norm.weight", "norm.bias", "bn.weight", "bn.bias", "a.bias", "b.bias", "pos"}
        for n in early:
            torch.testing.assert_close(block.get_parameter(n).grad, want[n], msg=n)
    else:
        assert not early
    if inputs_need_grad:
        torch.testing.assert_close(dx[0], want_x)
    else:
        assert dx == [None] and not work.groups  # the first stage: every weight in the second half
    weight_gradients(work)
    got = {n: p.grad for n, p in block.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and "unused" not in got
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)


def test_the_halves_compute_each_gradient_once() -> None:
    """Counted by a hook on the first linear's weight-gradient path: the weight half does not run
    the input path again."""
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(5, 6, requires_grad=True)
    calls = []
    block.a.weight.register_hook(lambda g: calls.append("a.weight"))
    h = x.register_hook(lambda g: calls.append("x"))
    out = block(x)
    _, work = input_gradients(out, [torch.ones(5, 6), torch.ones(5)], [x], list(block.parameters()))
    assert calls == ["x"]
    weight_gradients(work)
    assert calls == ["x", "a.weight"]
    h.remove()


def test_a_norm_runs_its_backward_once() -> None:
    """BatchNorm's weights take their gradient with the input gradient: its backward, the sums
    both need, runs once in the two halves as in one backward (twice before)."""

    class Counted(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.calls.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    out = block(x)
    with Counted() as whole:
        torch.autograd.backward([out], [torch.ones_like(out)], retain_graph=True)
    want = [p.grad.clone() for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    with Counted() as split:
        _, work = input_gradients([out], [torch.ones_like(out)], [x], list(block.parameters()))
        weight_gradients(work)
    norm = "aten.native_batch_norm_backward"
    assert whole.calls.count(norm) == 1 and split.calls.count(norm) == 1
    for p, w in zip(block.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w)
