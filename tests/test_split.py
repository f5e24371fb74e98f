"""The splitter: stages that chain by name, record their written inputs, and hold every tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tspipe_fx import TspipeError, capture
from tspipe_fx.passes import annotate_structure, annotate_symbolic
from tspipe_fx.passes.chain import graph_chain
from tspipe_fx.passes.split import split
from tspipe_fx.stage import run_stages


class InPlace(nn.Module):
    """A ReLU(inplace=True) right after where a cut goes, through a view (as in timm's ResNets)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(self.act(h.view(h.shape)))


def _split(model: nn.Module, x: torch.Tensor, cuts: list[int]) -> list:  # type: ignore[type-arg]
    gm = capture(model, (x,)).graph_module
    annotate_structure(gm)
    annotate_symbolic(gm, [x])
    gc = graph_chain(gm, {"B": x.shape[0]})
    return split(gc, cuts)


def test_stages_record_the_inputs_written_in_place() -> None:
    model, x = InPlace(), torch.randn(2, 4)
    stages = _split(model, x, [1])  # a | view, getattr, relu_, b
    assert stages[1].written_inputs == frozenset({"a"})  # written through the view
    assert stages[0].written_inputs == frozenset()
    torch.testing.assert_close(run_stages(stages, [x])[0], model(x))
    keys = [k for s in stages for k in s.module.state_dict()]
    assert sorted(keys) == sorted(model.state_dict())  # every tensor in exactly one stage


def test_bad_cuts_are_refused() -> None:
    model, x = InPlace(), torch.randn(2, 4)
    with pytest.raises(TspipeError, match="cuts must increase strictly"):
        _split(model, x, [2, 1])
    with pytest.raises(TspipeError, match="cuts must increase strictly"):
        _split(model, x, [0])
