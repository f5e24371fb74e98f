"""Cost models: the base class, the adapter, combinators and the four built-ins."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from tspipe_fx import Profile, TspipeError, capture, profile
from tspipe_fx.cost import (
    CostModel,
    MeasuredCost,
    NodeCost,
    ParamCountCost,
    RooflineCost,
    UniformCost,
    cost_model,
    scale,
    total,
)
from tspipe_fx.cost.devices import DEVICE_SPECS, DeviceSpec, device_spec, register_device_spec
from tspipe_fx.passes import annotate_structure, annotate_symbolic
from tspipe_fx.passes.meta import info


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def mlp() -> tuple[fx.GraphModule, Profile]:
    x = torch.randn(8, 64)
    cm = capture(MLP(), (x,))
    prof = profile(cm, (x,), repeats=2)
    gm = prof.attach(cm)
    return gm, prof


def _by_target(gm: fx.GraphModule, target: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target == target)


def test_measured_cost_reads_the_profile(mlp: tuple[fx.GraphModule, Profile]) -> None:
    gm, prof = mlp
    costs = MeasuredCost(prof).graph_costs(gm)
    assert len(costs) == len(gm.graph.nodes)
    fc1 = list(gm.graph.nodes).index(_by_target(gm, "fc1"))
    assert costs[fc1].fwd_ms == info(_by_target(gm, "fc1")).fwd_ms
    assert costs[fc1].memory_bytes == info(_by_target(gm, "fc1")).saved_bytes
    assert sum(c.fwd_ms for c in costs) == pytest.approx(prof.sum_fwd_ms)


def test_calibrated_costs_add_up_to_the_whole_model(mlp: tuple[fx.GraphModule, Profile]) -> None:
    """Each node keeps its share of the profile; the totals become the measured model's."""
    gm, prof = mlp
    raw = MeasuredCost(prof).graph_costs(gm)
    cal = MeasuredCost(prof, calibrate=True).graph_costs(gm)
    assert sum(c.fwd_ms for c in cal) == pytest.approx(prof.model_fwd_ms)
    assert sum(c.bwd_ms for c in cal) == pytest.approx(prof.model_fwd_bwd_ms - prof.model_fwd_ms)
    f, b = prof.model_fwd_ms / prof.sum_fwd_ms, (prof.model_fwd_bwd_ms - prof.model_fwd_ms) / prof.sum_bwd_ms
    for r, c in zip(raw, cal, strict=True):
        assert c.fwd_ms == pytest.approx(r.fwd_ms * f)
        assert c.bwd_ms == pytest.approx(r.bwd_ms * b)
        assert c.memory_bytes == r.memory_bytes


def test_measured_cost_scales_with_the_symbolic_flops(mlp: tuple[fx.GraphModule, Profile]) -> None:
    gm, prof = mlp
    full = MeasuredCost(prof).graph_costs(gm)
    half = MeasuredCost(prof, batch_size=4).graph_costs(gm)
    for a, b in zip(full, half, strict=True):
        assert b.fwd_ms == pytest.approx(a.fwd_ms / 2)  # every node here is linear in B
        assert b.bwd_ms == pytest.approx(a.bwd_ms / 2)
    with pytest.raises(TspipeError, match="seq_len given, but the profiled inputs have no sequence"):
        MeasuredCost(prof, seq_len=3)
    with pytest.raises(TspipeError, match="must be >= 1"):
        MeasuredCost(prof, batch_size=0)


def test_measured_cost_refuses_another_graph(mlp: tuple[fx.GraphModule, Profile]) -> None:
    _, prof = mlp
    other = capture(nn.Linear(64, 10), (torch.randn(8, 64),)).graph_module
    with pytest.raises(TspipeError, match="does not match this graph"):
        MeasuredCost(prof).graph_costs(other)


def test_roofline_is_the_max_of_compute_and_memory_time(mlp: tuple[fx.GraphModule, Profile]) -> None:
    gm, _ = mlp
    spec = DeviceSpec(
        "toy", {"float32": 1e-6}, memory_bandwidth_gbs=1.0, memory_bytes=2**30, launch_overhead_us=0
    )
    fc1 = _by_target(gm, "fc1")
    cost = RooflineCost(spec).graph_costs(gm)[list(gm.graph.nodes).index(fc1)]
    flops = 2 * 8 * 64 * 256
    assert cost.fwd_ms == pytest.approx(flops / 1e6 * 1e3)  # compute bound at 1 MFLOP/s
    assert cost.bwd_ms == pytest.approx(2 * cost.fwd_ms)
    fast = DeviceSpec(
        "toy2", {"float32": 1e6}, memory_bandwidth_gbs=1e-3, memory_bytes=2**30, launch_overhead_us=0
    )
    moved = 2 * 8 * 256 * 4 + (64 * 256 + 256) * 4
    slow = RooflineCost(fast).graph_costs(gm)[list(gm.graph.nodes).index(fc1)]
    assert slow.fwd_ms == pytest.approx(moved / 1e6 * 1e3)  # memory bound at 1 MB/s
    at1 = RooflineCost(spec, batch_size=1).graph_costs(gm)[list(gm.graph.nodes).index(fc1)]
    assert at1.fwd_ms == pytest.approx(cost.fwd_ms / 8)


class Views(nn.Module):
    """Views, identities and an in-place op among ops that move bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop, self.idn = nn.Linear(8, 24), nn.Dropout(0.0), nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.lin(x).reshape(2, 3, 4, 2).permute(1, 0, 2, 3).unbind(0)
        a = self.idn(self.drop(q)).transpose(1, 2).contiguous()
        return a.sum() + self.relu(k + 1).sum() + nn.functional.gelu(v).sum()


def test_views_cost_their_launch_alone() -> None:
    """The symbolic pass marks nodes whose outputs share an input's storage and write nothing:
    the roofline charges them a launch, no bytes and no kept activation. A copy (``contiguous``
    of a transposed tensor), an in-place ReLU and new values are not views."""
    x = torch.randn(2, 8)
    gm = capture(Views(), (x,)).graph_module
    annotate_structure(gm)
    annotate_symbolic(gm, [x])
    views = {n.name for n in gm.graph.nodes if info(n).view}
    assert views == {"reshape", "permute", "unbind", "getitem", "getitem_1", "getitem_2", "drop", "idn", "transpose"}
    spec = DeviceSpec("toy", {"float32": 1e9}, memory_bandwidth_gbs=1e-3, memory_bytes=2**30, launch_overhead_us=7)
    costs = dict(zip([n.name for n in gm.graph.nodes], RooflineCost(spec).graph_costs(gm), strict=True))
    assert all(costs[name] == NodeCost(0.007, 0.0, 0) for name in views)
    for name in ("contiguous", "relu", "gelu", "add"):  # each moves its output's bytes at 1 MB/s
        assert costs[name].fwd_ms > 0.007 + 1e-3


def test_roofline_needs_the_symbolic_pass() -> None:
    gm = capture(nn.Linear(4, 4), (torch.randn(2, 4),)).graph_module
    with pytest.raises(TspipeError, match="annotate_symbolic"):
        RooflineCost("h100").graph_costs(gm)
    annotate_structure(gm)
    annotate_symbolic(gm, [torch.randn(2, 4)])
    assert sum(c.fwd_ms for c in RooflineCost("h100").graph_costs(gm)) > 0


def test_param_count_and_uniform(mlp: tuple[fx.GraphModule, Profile]) -> None:
    gm, _ = mlp
    params = ParamCountCost().graph_costs(gm)
    assert sum(c.fwd_ms for c in params) == pytest.approx(
        sum(p.numel() * 4 for p in MLP().parameters()) / 2**20
    )
    uniform = UniformCost().graph_costs(gm)
    compute = [n for n in gm.graph.nodes if n.op.startswith("call")]
    assert sum(c.fwd_ms for c in uniform) == len(compute) == 3


def test_function_adapter_and_combinators(mlp: tuple[fx.GraphModule, Profile]) -> None:
    gm, _ = mlp

    @cost_model
    def ones(node: fx.Node) -> NodeCost:
        return NodeCost(1.0, 3.0, 10)

    assert ones.name == "ones" and isinstance(ones, CostModel)
    n = len(gm.graph.nodes)
    both = (ones + UniformCost()).graph_costs(gm)
    assert sum(c.fwd_ms for c in both) == n + 3
    doubled = (ones * 2).graph_costs(gm)
    assert doubled[0] == NodeCost(2.0, 6.0, 20)
    parts = scale(ones, fwd=1, bwd=0, memory=0.5).graph_costs(gm)
    assert parts[0] == NodeCost(1.0, 0.0, 5)
    assert total(ones, ones, ones).graph_costs(gm)[0] == NodeCost(3.0, 9.0, 30)


class _Subclass(CostModel):
    name = "flops"

    def node_cost(self, node: fx.Node) -> NodeCost:
        ms = info(node).fwd_flops / 1e6
        return NodeCost(ms, 2 * ms)


def test_subclass(mlp: tuple[fx.GraphModule, Profile]) -> None:
    gm, _ = mlp
    assert sum(c.fwd_ms for c in _Subclass().graph_costs(gm)) == pytest.approx(
        2 * 8 * (64 * 256 + 256 * 10) / 1e6, rel=0.01
    )


def test_bad_cost_models_are_clear_errors(mlp: tuple[fx.GraphModule, Profile]) -> None:
    gm, _ = mlp
    with pytest.raises(TspipeError, match=r"returned tuple for node 'x'; it must return a NodeCost"):
        cost_model(lambda n: (1.0, 2.0)).graph_costs(gm)  # type: ignore[arg-type, return-value]
    with pytest.raises(TspipeError, match="negative cost"):
        cost_model(lambda n: NodeCost(-1.0)).graph_costs(gm)
    with pytest.raises(TspipeError, match="needs a function"):
        cost_model(3)  # type: ignore[arg-type]
    with pytest.raises(TspipeError, match="scale factors must be >= 0"):
        scale(UniformCost(), -1)
    with pytest.raises(TspipeError, match="needs CostModel arguments"):
        total(UniformCost(), 3)  # type: ignore[arg-type]
    with pytest.raises(TspipeError, match="MeasuredCost needs a Profile"):
        MeasuredCost("p.json")  # type: ignore[arg-type]


def test_device_specs() -> None:
    assert {"h100", "a100", "v100", "cpu"} <= set(DEVICE_SPECS)
    assert device_spec("H100").peak_flops("bfloat16") == pytest.approx(989.4e12)
    assert device_spec("v100").peak_flops("bfloat16") == device_spec("v100").peak_flops("float32")
    pcie = device_spec("h100").with_link("pcie4")
    assert pcie.link_bandwidth_gbs == 25.0 and pcie.name == "h100"
    mine = register_device_spec(
        DeviceSpec("my-npu", {"float32": 5.0}, memory_bandwidth_gbs=100, memory_bytes=2**34)
    )
    assert device_spec("my-npu") is mine
    with pytest.raises(TspipeError, match=r"unknown device spec 'tpu'; known: .*register_device_spec"):
        device_spec("tpu")
    with pytest.raises(TspipeError, match="needs a 'float32' entry"):
        register_device_spec(DeviceSpec("bad", {"bfloat16": 1.0}, memory_bandwidth_gbs=1, memory_bytes=1))
    with pytest.raises(TspipeError, match="unknown link"):
        device_spec("h100").with_link("carrier-pigeon")


def test_compile_asks_every_cost_model_for_one_micro_batch() -> None:
    """A cost model handed to compile costs one micro-batch of the plan (batch_size / M), not the
    example it was captured with: a RooflineCost built without a batch size, a profile measured
    at the example's size, and a custom model through ``flops(node)`` all see B = 16 here."""
    from toys import Net

    import tspipe_fx
    from tspipe_fx.cost import flops

    torch.manual_seed(0)
    student, teacher = Net(16, 4), Net(16, 4).eval()
    x = torch.randn(2, 8)  # example: 2 samples; plan: 64 in 4 micro-batches of 16

    def plan_with(cm: object) -> tspipe_fx.Plan:
        return tspipe_fx.compile(student, teacher, 2, example_inputs=(x,), batch_size=64, micro_batches=4,
                                 cost_model=cm, schedule=None).plan  # type: ignore[arg-type]  # fmt: skip

    def stage_ms(plan: tspipe_fx.Plan) -> list[float]:
        return [s.fwd_ms for s in (*plan.student.stages, *plan.teacher.stages)]

    implicit, explicit = plan_with(RooflineCost("h100")), plan_with(RooflineCost("h100", batch_size=16))
    assert stage_ms(implicit) == pytest.approx(stage_ms(explicit))
    assert stage_ms(implicit) != pytest.approx(stage_ms(plan_with(RooflineCost("h100", batch_size=2))))

    seen: list[int] = []

    @cost_model
    def by_flops(node: fx.Node) -> NodeCost:
        if node.target == "a":
            seen.append(flops(node))
        return NodeCost(flops(node) / 1e9, 2 * flops(node) / 1e9)

    plan_with(by_flops)
    assert seen == [2 * 16 * 8 * 16] * 2  # student and teacher layer a at B = 16
    cm = capture(Net(16, 4), (x,))
    annotate_structure(cm.graph_module)
    annotate_symbolic(cm.graph_module, [x])
    a = _by_target(cm.graph_module, "a")
    assert flops(a) == info(a).fwd_flops == 2 * 2 * 8 * 16  # outside compile: the example's size
    captured = capture(student, (x,))
    before = dict(captured.graph_module.meta)
    tspipe_fx.compile(captured, capture(teacher, (x,)), 2, example_inputs=(x,), batch_size=64, micro_batches=4,
                      cost_model="uniform")  # fmt: skip
    assert captured.graph_module.meta.keys() - {"tspipe_sizes"} == before.keys()  # compile leaves the graphs as they were
