"""Graph passes: structure, symbolic FLOPs/bytes and measurement, each writing node.meta."""

from __future__ import annotations

import copy

import pytest
import sympy
import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from zoo import BY_NAME

from tspipe_fx import capture
from tspipe_fx.passes import annotate_measured, annotate_structure, annotate_symbolic
from tspipe_fx.passes.meta import META_KEY, NodeInfo, info
from tspipe_fx.passes.symbolic import BATCH, SEQ, evaluate


def _captured(name: str, batch: int = 2) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    case = BY_NAME[name]
    cm = capture(case.build(), case.inputs(batch), example_kwargs=case.kwargs(batch))
    return cm.graph_module, cm.flatten_inputs(case.inputs(batch), case.kwargs(batch))


def test_structure_records_module_paths_and_owns_every_parameter_once() -> None:
    gm, _ = _captured("hf_bert_mlm")
    annotate_structure(gm)
    assert all(isinstance(n.meta[META_KEY], NodeInfo) for n in gm.graph.nodes)
    paths = {info(n).module_path for n in gm.graph.nodes}
    assert "bert.encoder.layer.1.attention.self" in paths
    names = [p for n in gm.graph.nodes for p in info(n).param_names]
    # The tied decoder weight is one tensor: the graph reads it once.
    state = dict(gm.state_dict(keep_vars=True))
    unique = {id(t): t for t in state.values()}
    owned = {id(state[p]) for p in names if p in state}
    assert owned == set(unique)


def test_structure_types_of_fx_modules() -> None:
    gm, _ = _captured("torchvision_resnet18")
    annotate_structure(gm)
    node = next(n for n in gm.graph.nodes if n.target == "layer1.0.conv1")
    assert info(node).module_type == "Conv2d"
    assert info(node).param_bytes == 64 * 64 * 9 * 4
    assert info(node).param_names == ("layer1.0.conv1.weight",)
    total = sum(info(n).param_bytes for n in gm.graph.nodes)
    assert total == sum(t.numel() * 4 for t in gm.state_dict().values() if t.is_floating_point()) + sum(
        t.numel() * t.element_size() for t in gm.state_dict().values() if not t.is_floating_point()
    )


@pytest.mark.parametrize(
    ("name", "unseen"),
    [("timm_resnet18", {"B": 5}), ("timm_vit", {"B": 7}), ("hf_bert_mlm", {"B": 3, "S": 13}),
     ("hf_gpt2_lm", {"B": 5, "S": 11})],
)  # fmt: skip
def test_symbolic_flops_at_an_unseen_size_equal_the_flop_counter(name: str, unseen: dict[str, int]) -> None:
    gm, inputs = _captured(name)
    annotate_symbolic(gm, inputs)
    total = sympy.expand(
        sum(sympy.sympify(info(n).flops_expr, locals={"B": BATCH, "S": SEQ}) for n in gm.graph.nodes)
    )
    assert total.free_symbols <= {BATCH, SEQ} and BATCH in total.free_symbols
    case = BY_NAME[name]
    b, s = unseen["B"], unseen.get("S", 8)
    args = case.inputs(b)
    kwargs = {
        k: (v[:, :1].expand(b, s).contiguous() if isinstance(v, torch.Tensor) else v)
        for k, v in case.kwargs(b).items()
    }
    cm = capture(case.build(), case.inputs(2), example_kwargs=case.kwargs(2))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cm(*args, **kwargs)
    assert evaluate(str(total), {"B": b, "S": s}) == counter.get_total_flops()


def test_symbolic_bytes_and_example_values() -> None:
    gm, inputs = _captured("torchvision_resnet18", batch=4)
    annotate_symbolic(gm, inputs)
    conv = next(n for n in gm.graph.nodes if n.target == "conv1")
    assert info(conv).output_bytes_expr == str(64 * 16 * 16 * 4 * BATCH)
    assert info(conv).output_bytes == 4 * 64 * 16 * 16 * 4
    assert info(conv).fwd_flops == evaluate(info(conv).flops_expr, {"B": 4}) > 0


def test_symbolic_falls_back_to_constants_when_the_graph_fixes_the_batch() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.view(2, 8))

    cm = capture(Fixed(), (torch.randn(2, 8),))
    annotate_symbolic(cm.graph_module, [torch.randn(2, 8)])
    lin = next(n for n in cm.graph_module.graph.nodes if n.op == "call_module")
    assert info(lin).flops_expr == str(2 * 2 * 8 * 8)


def test_measure_times_every_node_and_finds_the_gradient_path() -> None:
    gm, inputs = _captured("timm_resnet18")
    work = copy.deepcopy(gm)
    annotate_measured(work, inputs, repeats=2)
    nodes = {n.name: n for n in work.graph.nodes}
    assert all(info(n).fwd_ms is not None and info(n).fwd_ms >= 0 for n in work.graph.nodes)
    assert not info(nodes["x"]).on_grad_path
    conv = next(n for n in work.graph.nodes if n.target == "conv1")
    assert info(conv).on_grad_path and info(conv).bwd_ms > 0 and info(conv).bwd_flops > 0
    # timm's ReLU is in place: its backward is still measured (on a clone of its input).
    act = next(n for n in work.graph.nodes if n.target == "act1")
    assert info(act).on_grad_path and info(act).bwd_ms > 0
    assert info(conv).saved_bytes > 0  # conv keeps its input for the weight gradient


def test_measure_off_the_gradient_path_costs_no_backward() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    for p in model.parameters():
        p.requires_grad_(False)
    cm = capture(model, (torch.randn(3, 4),))
    annotate_measured(cm.graph_module, [torch.randn(3, 4)], repeats=1)
    assert all(not info(n).on_grad_path and info(n).bwd_ms == 0 for n in cm.graph_module.graph.nodes)
