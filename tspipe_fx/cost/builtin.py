"""The built-in cost models: measured (a profile), roofline (a device spec), parameter count, uniform."""

from __future__ import annotations

import functools

import torch.fx as fx

from tspipe_fx.cost.devices import DeviceSpec, device_spec
from tspipe_fx.cost.model import NO_COST_OPS, CostModel, NodeCost, example_sizes
from tspipe_fx.cost.profile import Profile
from tspipe_fx.errors import TspipeError
from tspipe_fx.passes.meta import NodeInfo, info
from tspipe_fx.passes.symbolic import evaluate

__all__ = ["MeasuredCost", "ParamCountCost", "RooflineCost", "UniformCost"]


class _Scaling:
    """Ratios that carry costs measured at one batch size to another, from symbolic expressions."""

    def __init__(
        self,
        base: dict[str, int],
        batch_size: int | None,
        seq_len: int | None,
        asked: dict[str, int] | None = None,
    ):
        if (batch_size is not None and batch_size < 1) or (seq_len is not None and seq_len < 1):
            raise TspipeError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        self.base = base
        # the graph's cost sizes (a plan's micro-batch) unless the model was given its own
        self.target = {**base, **{k: v for k, v in (asked or {}).items() if k in base}}
        if batch_size is not None:
            self.target["B"] = batch_size
        if seq_len is not None:
            if "S" not in base:
                raise TspipeError("seq_len given, but the profiled inputs have no sequence dimension")
            self.target["S"] = seq_len

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - few distinct expressions, one model each
    def ratio(self, expr: str) -> float | None:
        """value(target) / value(base), or None where the expression is zero at the base size."""
        base = evaluate(expr, self.base)
        return evaluate(expr, self.target) / base if base else None

    def at_target(self, expr: str) -> int:
        return evaluate(expr, self.target)

    def node(self, i: NodeInfo) -> float:
        """How much the node's work grows: its FLOPs ratio, else its output bytes ratio."""
        return self.ratio(i.flops_expr) or self.ratio(i.output_bytes_expr) or 1.0


class MeasuredCost(CostModel):
    """Measured times from a :class:`Profile` (scaled by the symbolic FLOPs at another batch size).

    A node costs at least its operations' launches (``fwd_ops``, ``bwd_ops`` times the profile's
    ``launch_us``, :mod:`tspipe_fx.cost.launch`): a profile times the device's work alone, and a
    node of small kernels waits for the host that launches them. Per node, the host is taken to
    run at most one node ahead (an upper bound on a stage of mixed nodes).

    With ``calibrate=True`` the node times are scaled so that they add up to the whole model's
    measured forward and backward: each node keeps its share, the model its true total. The
    isolated node timings miss what a whole run adds or saves (cache reuse, accumulating weight
    gradients, launch overlap), and by different amounts for different models, which tilts the
    balance between a teacher's forward and a student's backward.

    Example:
        >>> MeasuredCost(tspipe_fx.profile(model, (x,)), batch_size=4)
    """

    name = "measured"

    def __init__(
        self,
        profile: Profile,
        *,
        batch_size: int | None = None,
        seq_len: int | None = None,
        calibrate: bool = False,
    ):
        if not isinstance(profile, Profile):
            raise TspipeError(f"MeasuredCost needs a Profile, got {type(profile).__name__}")
        self.profile = profile
        self.batch_size, self.seq_len = batch_size, seq_len
        self.scaling = _Scaling(profile.sizes, batch_size, seq_len)
        self.by_node: dict[fx.Node, NodeInfo] = {}
        self.fwd_scale = self.bwd_scale = 1.0
        if calibrate:
            bwd_model = profile.model_fwd_bwd_ms - profile.model_fwd_ms
            if profile.sum_fwd_ms > 0 and profile.model_fwd_ms > 0:
                self.fwd_scale = profile.model_fwd_ms / profile.sum_fwd_ms
            if profile.sum_bwd_ms > 0 and bwd_model > 0:
                self.bwd_scale = bwd_model / profile.sum_bwd_ms

    def prepare(self, gm: fx.GraphModule, sizes: dict[str, int]) -> None:
        self.profile.check(gm)  # same structure: nodes match the profile's by position
        self.scaling = _Scaling(self.profile.sizes, self.batch_size, self.seq_len, sizes)
        self.by_node = {node: rec.info for node, rec in zip(gm.graph.nodes, self.profile.nodes, strict=True)}

    def node_cost(self, node: fx.Node) -> NodeCost:
        if node not in self.by_node:
            raise TspipeError(f"MeasuredCost: node {node.name!r} is not in the graph it was prepared for")
        i = self.by_node[node]
        r = self.scaling.node(i)
        mem = self.scaling.ratio(i.output_bytes_expr) or 1.0
        launch_ms = self.profile.launch_us / 1e3  # the host's launches floor a node's time
        launch_bwd_ms = (self.profile.launch_bwd_us or self.profile.launch_us) / 1e3
        return NodeCost(
            max((i.fwd_ms or 0.0) * r * self.fwd_scale, i.fwd_ops * launch_ms),
            max((i.bwd_ms or 0.0) * r * self.bwd_scale, i.bwd_ops * launch_bwd_ms),
            round(i.saved_bytes * mem),
        )


class RooflineCost(CostModel):
    """Time from FLOPs and bytes: ``max(flops / peak, bytes / bandwidth) + launch overhead``.

    A view or an identity (``view``: its output shares an input's storage) moves no bytes and
    keeps nothing for backward: it costs its launch alone (an H100 profile times such nodes at
    the 1.3 µs launch floor, where a memory pass over one of its ViT-S activations takes 6 µs).

    Backward costs ``bwd_factor`` times the forward (2: one GEMM each for input and weight
    gradients) on nodes whose output needs a gradient. Needs only the structure and symbolic
    passes: no measurement.
    """

    name = "roofline"

    def __init__(
        self,
        device: str | DeviceSpec = "cpu",
        *,
        dtype: str = "float32",
        batch_size: int | None = None,
        seq_len: int | None = None,
        bwd_factor: float = 2.0,
    ):
        self.spec = device_spec(device)
        self.dtype = dtype
        self.batch_size, self.seq_len = batch_size, seq_len
        self.bwd_factor = bwd_factor
        self.scaling: _Scaling | None = None

    def prepare(self, gm: fx.GraphModule, sizes: dict[str, int]) -> None:
        self.scaling = _Scaling(example_sizes(gm), self.batch_size, self.seq_len, sizes)

    def node_cost(self, node: fx.Node) -> NodeCost:
        if node.op in NO_COST_OPS:
            return NodeCost()
        assert self.scaling is not None, "prepare() first"
        i = info(node)
        launch_ms = self.spec.launch_overhead_us * 1e-3
        if i.view:  # a view or an identity: launched (the host dispatches it), no bytes, nothing kept
            return NodeCost(launch_ms, launch_ms if i.on_grad_path else 0.0, 0)
        flops = self.scaling.at_target(i.flops_expr)
        out_bytes = self.scaling.at_target(i.output_bytes_expr)
        moved = 2 * out_bytes + i.param_bytes  # read about as much as written, plus the weights
        seconds = max(
            flops / self.spec.peak_flops(self.dtype), moved / (self.spec.memory_bandwidth_gbs * 1e9)
        )
        fwd_ms = seconds * 1e3 + launch_ms
        trains = i.on_grad_path or i.param_bytes > 0 or flops > 0
        return NodeCost(fwd_ms, fwd_ms * self.bwd_factor if trains else 0.0, out_bytes if trains else 0)


class ParamCountCost(CostModel):
    """Cost proportional to the parameter bytes a node owns (DeepSpeed ``"parameters"``).

    Units are not milliseconds: 1 "ms" per MiB of parameters, backward twice that. Only
    balance is meaningful, not the predicted period.
    """

    name = "params"

    def node_cost(self, node: fx.Node) -> NodeCost:
        mib = info(node).param_bytes / 2**20
        return NodeCost(mib, 2 * mib, 0)


class UniformCost(CostModel):
    """Every compute node costs the same (DeepSpeed ``"uniform"``): balances node counts."""

    name = "uniform"

    def node_cost(self, node: fx.Node) -> NodeCost:
        return NodeCost() if node.op in NO_COST_OPS else NodeCost(1.0, 2.0, 0)
