"""Stage GraphModules run in order give the unsplit model's outputs and parameter gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import BY_NAME

from tspipe_fx import TspipeError, capture
from tspipe_fx.passes import annotate_structure, annotate_symbolic
from tspipe_fx.passes.chain import GraphChain, candidate_cuts, graph_chain
from tspipe_fx.passes.meta import META_KEY
from tspipe_fx.passes.split import split
from tspipe_fx.stage import run_stages, tie_groups


def _chain(name: str) -> tuple[nn.Module, GraphChain, list[torch.Tensor]]:
    case = BY_NAME[name]
    model = case.build()
    cm = capture(model, case.inputs(2), example_kwargs=case.kwargs(2))
    flat = cm.flatten_inputs(case.inputs(2), case.kwargs(2))
    annotate_structure(cm.graph_module)
    annotate_symbolic(cm.graph_module, flat)
    return model, graph_chain(cm.graph_module, {"B": 1, "S": 8}), flat


def _loss(outs: tuple[object, ...]) -> torch.Tensor:
    return sum(
        o.float().square().mean() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()
    )  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("name", "skip"),
    [
        ("timm_resnet18", True),  # fx; a cut inside a residual block: two tensors cross
        ("torchvision_resnet18", True),
        ("timm_vit", True),
        ("hf_bert_mlm", False),  # export; tied decoder and word embeddings
        ("hf_gpt2_lm", False),  # export; tied lm_head and wte
        ("timm_swin", False),  # export
    ],
)
def test_stages_in_order_equal_the_model(name: str, skip: bool) -> None:
    model, gc, flat = _chain(name)
    cands = list(gc.candidates)
    if skip:  # prefer cuts where a skip connection crosses
        crossing = [p for p in cands if len(gc.live[p]) >= 2]
        assert crossing, "no cut with a skip connection crossing"
        cuts = sorted({crossing[len(crossing) // 2], cands[len(cands) // 4], cands[3 * len(cands) // 4]})
    else:
        cuts = [cands[len(cands) // 4], cands[len(cands) // 2], cands[3 * len(cands) // 4]]
    stages = split(gc, cuts)

    torch.manual_seed(3)
    ref = tuple(gc.gm(*flat))
    _loss(ref).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    out = run_stages(stages, flat)
    _loss(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert len(out) == len(ref)
    for a, b in zip(ref, out, strict=True):
        assert torch.equal(a, b)  # the same ops in the same order: bit-equal on CPU
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-7, msg=k)

    # Invariants: contiguous non-empty stages covering every compute node once, in order.
    assert [n for s in stages for n in s.nodes] == [n.name for n in gc.nodes]
    assert all(s.nodes for s in stages)
    # The union of the stages' state_dict keys is the model's.
    assert set().union(*(s.module.state_dict().keys() for s in stages)) == set(model.state_dict())
    # Every tensor lives in exactly one stage, unless it is in a tie group.
    tied = {name for names, _ in tie_groups(stages) for name in names}
    for key in model.state_dict():
        holders = [k for k, s in enumerate(stages) if key in s.module.state_dict()]
        assert len(holders) == 1 or key in tied, (key, holders)
    # node.meta travels with the nodes.
    for s in stages:
        assert all(META_KEY in n.meta for n in s.module.graph.nodes if n.op != "output")


def test_tie_groups_name_the_tied_weights() -> None:
    _, gc, _ = _chain("hf_gpt2_lm")
    cands = gc.candidates
    stages = split(gc, [cands[len(cands) // 2]])
    assert tie_groups(stages) == [(("lm_head.weight", "transformer.wte.weight"), (0, 1))]
    assert stages[0].module.get_parameter("lm_head.weight") is stages[1].module.get_parameter(
        "lm_head.weight"
    )


def test_stage_io_is_the_live_set() -> None:
    _, gc, _ = _chain("timm_resnet18")
    inside = next(p for p in gc.candidates if len(gc.live[p]) == 2)
    stages = split(gc, [inside])
    assert stages[0].inputs == ("x",)
    assert stages[0].outputs == stages[1].inputs == tuple(v.name for v in gc.live[inside])
    assert len(stages[1].outputs) == 1  # the logits
    # Module names map to positions: a manual split point.
    assert gc.nodes[gc.module_position("layer3")].name.startswith("layer3")


def test_live_sets_of_a_skip_connection() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.c(self.b(h) + h)

    cm = capture(Skip(), (torch.randn(2, 4),))
    annotate_structure(cm.graph_module)
    annotate_symbolic(cm.graph_module, [torch.randn(2, 4)])
    gc = graph_chain(cm.graph_module, {"B": 2})
    assert [n.name for n in gc.nodes] == ["a", "b", "add", "c"]
    assert [[v.name for v in vs] for vs in gc.live] == [["x"], ["a"], ["a", "b"], ["add"], ["c"]]
    assert gc.live_bytes == (32, 32, 64, 32, 32)
    assert gc.candidates == (1, 3)  # the cut inside the skip is not a local minimum


def test_no_cut_sends_a_tuple_of_tensors() -> None:
    """``q, k = h.chunk(2)``: between ``chunk`` and its ``getitem`` nodes only the tuple is live
    and its bytes are a local minimum; stage boundaries carry tensors, so it is no candidate, and
    a manual cut there is refused with a hint."""

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k = self.a(x).chunk(2, dim=-1)
            return self.b(q * k)

    cm = capture(Split(), (torch.randn(2, 4),))
    annotate_structure(cm.graph_module)
    annotate_symbolic(cm.graph_module, [torch.randn(2, 4)])
    gc = graph_chain(cm.graph_module, {"B": 2})
    names = [n.name for n in gc.nodes]
    assert names[:4] == ["a", "chunk", "getitem", "getitem_1"]
    tuple_live = names.index("getitem")  # the cut before the first getitem: only the tuple is live
    assert [v.name for v in gc.live[tuple_live]] == ["chunk"]
    assert tuple_live in candidate_cuts(gc.live_bytes, 128)  # a local minimum by bytes alone
    assert gc.candidates == (names.index("b"),)
    with pytest.raises(TspipeError, match=r"would send \['chunk'\], tuples of tensors.*hint: cut after"):
        split(gc, [tuple_live])
    x = torch.randn(3, 4)
    stages = split(gc, [names.index("mul")])  # the unpacked tensors may cross
    torch.testing.assert_close(run_stages(stages, [x])[0], cm.graph_module(x)[0])
