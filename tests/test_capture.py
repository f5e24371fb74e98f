"""capture(): real models from configs give the same outputs and gradients as the originals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves
from zoo import CASES, Case

import tspipe_fx
from tspipe_fx import CaptureError, capture


def _loss(out: Any) -> torch.Tensor:
    return sum(
        t.float().square().mean()
        for t in tree_leaves(out)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    )


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_captured_model_trains_like_the_original(case: Case) -> None:
    model = case.build()
    captured = capture(model, case.inputs(2), example_kwargs=case.kwargs(2))
    assert captured.method == case.method
    assert isinstance(captured.graph_module, fx.GraphModule)

    # Another batch size than the example's: same outputs, same structure, same gradients.
    batch = 2 if not captured.dynamic_batch else 3
    args, kwargs = case.inputs(batch), case.kwargs(batch)
    torch.manual_seed(1)  # same random ops (Swin's stochastic depth) in both runs
    ref = model(*args, **kwargs)
    _loss(ref).backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = captured(*args, **kwargs)
    _loss(out).backward()
    grads = _grads(model)

    assert type(out) is type(ref)
    for a, b in zip(tree_leaves(ref), tree_leaves(out), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parameters_are_the_users_own_tensors(case: Case) -> None:
    model = case.build()
    captured = capture(model, case.inputs(2), example_kwargs=case.kwargs(2))
    mine = {id(p) for p in model.parameters()}
    theirs = {id(p) for p in captured.graph_module.parameters()}
    assert theirs == mine


def test_graph_takes_flat_tensors_and_returns_a_flat_tuple() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, extra: dict[str, torch.Tensor], scale: float = 1.0) -> Any:
            return {"a": self.a(x) * scale, "both": (self.b(x), self.b(extra["y"]))}

    model = TwoHeads()
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    captured = capture(model, (x, {"y": y}), example_kwargs={"scale": 2.0})
    assert captured.input_names == ("x", "extra_y")
    placeholders = [n.target for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "extra_y"]
    flat = captured.graph_module(x, y)
    assert isinstance(flat, tuple) and len(flat) == 3
    out = captured(x, {"y": y}, scale=2.0)
    torch.testing.assert_close(out["a"], model(x, {"y": y}, scale=2.0)["a"])
    with pytest.raises(CaptureError, match=r"captured with scale=2.0.*called with scale=3.0"):
        captured(x, {"y": y}, scale=3.0)
    with pytest.raises(CaptureError, match="structured as"):
        captured(x, {"z": y}, scale=2.0)


def test_leaf_modules_stay_opaque() -> None:
    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) + 1

    model = nn.Sequential(nn.Linear(4, 4), Block(), nn.Linear(4, 2))
    by_type = capture(model, (torch.randn(2, 4),), leaf_modules=[Block])
    by_name = capture(model, (torch.randn(2, 4),), leaf_modules=["1"])
    for cm in (by_type, by_name):
        assert [n.target for n in cm.graph_module.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]


def test_module_paths_are_the_users_names() -> None:
    import torchvision

    cm = capture(torchvision.models.resnet18(num_classes=4), (torch.randn(1, 3, 32, 32),))
    targets = [n.target for n in cm.graph_module.graph.nodes if n.op == "call_module"]
    assert targets[:2] == ["conv1", "bn1"] and "layer3.1.conv2" in targets
    assert not any(str(t).startswith("model.") for t in targets)


# --- bad input -------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on a tensor's value: neither tracer can follow it
            return self.lin(x)
        return -x


def test_untraceable_model_names_both_reasons_and_a_hint() -> None:
    with pytest.raises(CaptureError) as err:
        capture(DataDependent(), (torch.randn(2, 4),))
    msg = str(err.value)
    assert "could not capture DataDependent" in msg
    assert "fx: TraceError" in msg and "export:" in msg
    assert "in module (root) (DataDependent)" in msg  # where tracing broke: the module...
    assert "test_capture.py" in msg  # ... and the line
    assert "hint:" in msg and "leaf_modules" in msg


def test_error_names_the_innermost_module() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), DataDependent()))
    with pytest.raises(CaptureError, match=r"fx: TraceError: .* in module 1\.1 \(DataDependent\)"):
        capture(model, (torch.randn(2, 4),))


def test_method_fx_only_does_not_fall_back() -> None:
    with pytest.raises(CaptureError, match="fx:") as err:
        capture(DataDependent(), (torch.randn(2, 4),), method="fx")
    assert "export:" not in str(err.value)


@pytest.mark.parametrize(
    ("model", "inputs", "kwargs", "match"),
    [
        (lambda x: x, (torch.randn(2),), None, "needs an nn.Module, got function"),
        (nn.Linear(2, 2), "abc", None, "example_inputs must be a tensor or a tuple"),
        (nn.Linear(2, 2), (torch.randn(1, 2),), [1], "example_kwargs must be a dict"),
        (nn.Linear(2, 2), (), None, "has no tensor input"),
        (nn.Linear(2, 2), (torch.randn(1, 2), torch.randn(1, 2)), None, "does not fit Linear.forward"),
        (nn.Linear(2, 2), (torch.randn(1, 2, device="meta"),), None, "example input on meta but Linear's"),
    ],
)
def test_bad_arguments(model: Any, inputs: Any, kwargs: Any, match: str) -> None:
    with pytest.raises(CaptureError, match=match):
        capture(model, inputs, example_kwargs=kwargs)


def test_bad_method() -> None:
    with pytest.raises(CaptureError, match="method must be"):
        capture(nn.Linear(2, 2), (torch.randn(1, 2),), method="jit")  # type: ignore[arg-type]


def test_capture_errors_are_value_errors() -> None:
    assert issubclass(CaptureError, tspipe_fx.TspipeError) and issubclass(CaptureError, ValueError)
