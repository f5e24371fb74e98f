"""Pluggable cost models: node -> (forward ms, backward ms, activation memory bytes).

One small base class, a function adapter and two combinators, after
``torch/fx/passes/operator_support.py`` (``OperatorSupportBase``, ``create_op_support``,
``chain``):

* :class:`CostModel` - subclass and implement :meth:`CostModel.node_cost`;
* :func:`cost_model` - turn a plain function ``node -> NodeCost`` into one;
* :func:`scale` and :func:`total` (also ``model * 2.0`` and ``a + b``).

Built-ins: :class:`MeasuredCost` (a :class:`~tspipe_fx.Profile`), :class:`RooflineCost`
(FLOPs and bytes against a :class:`~tspipe_fx.devices.DeviceSpec`), :class:`ParamCountCost`
(DeepSpeed's ``partition_method="parameters"``) and :class:`UniformCost` (``"uniform"``).

Cost models read what the passes wrote in ``node.meta["tspipe"]`` (:mod:`tspipe_fx.meta`).
A cost is for one micro-batch of the plan being compiled: :func:`tspipe_fx.compile` records its
sizes on the graph (:func:`tspipe_fx.passes.symbolic.cost_sizes`), the built-ins scale what was
measured or counted at the example's size to them through the symbolic FLOPs and bytes
expressions, and :func:`flops` and :func:`output_bytes` give a custom model the same figures
(``info(node).fwd_flops`` is at the example's size). ``batch_size=`` (and ``seq_len=``) on a
built-in fixes the size instead.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from tspipe_fx.devices import DeviceSpec, device_spec
from tspipe_fx.errors import TspipeError
from tspipe_fx.meta import NodeInfo, info
from tspipe_fx.passes.symbolic import COST_SIZES_KEY, SIZES_KEY, cost_sizes, evaluate
from tspipe_fx.profiling import Profile

__all__ = [
    "CostModel",
    "MeasuredCost",
    "NodeCost",
    "ParamCountCost",
    "RooflineCost",
    "UniformCost",
    "cost_model",
    "flops",
    "output_bytes",
    "scale",
    "total",
]

_NO_COST_OPS = ("placeholder", "output", "get_attr")


@dataclass(frozen=True)
class NodeCost:
    """The cost of one node for one micro-batch."""

    fwd_ms: float = 0.0
    bwd_ms: float = 0.0
    memory_bytes: int = 0  # activations kept from forward until backward

    def __add__(self, other: NodeCost) -> NodeCost:
        return NodeCost(
            self.fwd_ms + other.fwd_ms, self.bwd_ms + other.bwd_ms, self.memory_bytes + other.memory_bytes
        )

    def scaled(self, fwd: float = 1.0, bwd: float = 1.0, memory: float = 1.0) -> NodeCost:
        return NodeCost(self.fwd_ms * fwd, self.bwd_ms * bwd, round(self.memory_bytes * memory))


class CostModel(ABC):
    """Base class: say what a node costs.

    Example:
        >>> class FlopsOnly(CostModel):
        ...     def node_cost(self, node):
        ...         f = info(node).fwd_flops / 1e9  # 1 ms per GFLOP
        ...         return NodeCost(f, 2 * f)
    """

    name: str = "custom"

    @abstractmethod
    def node_cost(self, node: fx.Node) -> NodeCost:
        """The cost of ``node`` for one micro-batch."""

    def prepare(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook, empty by default
        """Called once per graph before :meth:`node_cost`: check the graph fits this model."""

    def graph_costs(self, gm: fx.GraphModule) -> list[NodeCost]:
        """One cost per node, in graph order."""
        self.prepare(gm)
        costs = []
        for node in gm.graph.nodes:
            cost = self.node_cost(node)
            if not isinstance(cost, NodeCost):
                raise TspipeError(
                    f"cost model {self.name!r} returned {type(cost).__name__} for node {node.name!r}; "
                    "it must return a NodeCost"
                )
            if min(cost.fwd_ms, cost.bwd_ms, cost.memory_bytes) < 0:
                raise TspipeError(
                    f"cost model {self.name!r} returned a negative cost for {node.name!r}: {cost}"
                )
            costs.append(cost)
        return costs

    def __add__(self, other: CostModel) -> CostModel:
        return total(self, other)

    def __mul__(self, factor: float) -> CostModel:
        return scale(self, factor)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class _FunctionCost(CostModel):
    def __init__(self, fn: Callable[[fx.Node], NodeCost], name: str):
        self.fn = fn
        self.name = name

    def node_cost(self, node: fx.Node) -> NodeCost:
        return self.fn(node)


def cost_model(fn: Callable[[fx.Node], NodeCost], *, name: str | None = None) -> CostModel:
    """Adapt a function ``node -> NodeCost`` into a :class:`CostModel` (usable as a decorator)."""
    if not callable(fn):
        raise TspipeError(f"cost_model() needs a function node -> NodeCost, got {type(fn).__name__}")
    return _FunctionCost(fn, name or str(getattr(fn, "__name__", "function")))


class _Scaled(CostModel):
    def __init__(self, inner: CostModel, fwd: float, bwd: float, memory: float):
        self.inner, self.factors = inner, (fwd, bwd, memory)
        self.name = (
            f"{inner.name}*({fwd},{bwd},{memory})" if len(set(self.factors)) > 1 else f"{inner.name}*{fwd}"
        )

    def prepare(self, gm: fx.GraphModule) -> None:
        self.inner.prepare(gm)

    def node_cost(self, node: fx.Node) -> NodeCost:
        return self.inner.node_cost(node).scaled(*self.factors)


def scale(model: CostModel, factor: float = 1.0, *, fwd: float | None = None, bwd: float | None = None,
          memory: float | None = None) -> CostModel:  # fmt: skip
    """``model`` with its costs multiplied: all by ``factor``, or each part by its own."""
    factors = [factor if f is None else f for f in (fwd, bwd, memory)]
    if min(factors) < 0:
        raise TspipeError(f"scale factors must be >= 0, got fwd, bwd, memory = {factors}")
    return _Scaled(model, *factors)


class _Sum(CostModel):
    def __init__(self, models: tuple[CostModel, ...]):
        self.models = models
        self.name = "+".join(m.name for m in models)

    def prepare(self, gm: fx.GraphModule) -> None:
        for m in self.models:
            m.prepare(gm)

    def node_cost(self, node: fx.Node) -> NodeCost:
        return functools.reduce(NodeCost.__add__, (m.node_cost(node) for m in self.models), NodeCost())


def total(*models: CostModel) -> CostModel:
    """The sum of several cost models (compute from one, communication overhead from another)."""
    if not models or not all(isinstance(m, CostModel) for m in models):
        raise TspipeError(f"total() needs CostModel arguments, got {[type(m).__name__ for m in models]}")
    return _Sum(models)


# --- built-ins -------------------------------------------------------------------------------


def flops(node: fx.Node) -> int:
    """The node's forward FLOPs at the sizes costs are asked for (one micro-batch of the plan)."""
    return evaluate(info(node).flops_expr, _asked(node))


def output_bytes(node: fx.Node) -> int:
    """The bytes of the node's outputs at the sizes costs are asked for."""
    return evaluate(info(node).output_bytes_expr, _asked(node))


def _asked(node: fx.Node) -> dict[str, int]:
    gm = node.graph.owning_module
    return cost_sizes(gm) if isinstance(gm, fx.GraphModule) else {}


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

    def prepare(self, gm: fx.GraphModule) -> None:
        self.profile.check(gm)  # same structure: nodes match the profile's by position
        asked = gm.meta.get(COST_SIZES_KEY)
        self.scaling = _Scaling(self.profile.sizes, self.batch_size, self.seq_len, asked)
        self.by_node = {node: rec.info for node, rec in zip(gm.graph.nodes, self.profile.nodes, strict=True)}

    def node_cost(self, node: fx.Node) -> NodeCost:
        if node not in self.by_node:
            raise TspipeError(f"MeasuredCost: node {node.name!r} is not in the graph it was prepared for")
        i = self.by_node[node]
        r = self.scaling.node(i)
        mem = self.scaling.ratio(i.output_bytes_expr) or 1.0
        return NodeCost(
            (i.fwd_ms or 0.0) * r * self.fwd_scale,
            (i.bwd_ms or 0.0) * r * self.bwd_scale,
            round(i.saved_bytes * mem),
        )


class RooflineCost(CostModel):
    """Time from FLOPs and bytes: ``max(flops / peak, bytes / bandwidth) + launch overhead``.

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

    def prepare(self, gm: fx.GraphModule) -> None:
        sizes = _example_sizes(gm)
        self.scaling = _Scaling(sizes, self.batch_size, self.seq_len, cost_sizes(gm))

    def node_cost(self, node: fx.Node) -> NodeCost:
        if node.op in _NO_COST_OPS:
            return NodeCost()
        assert self.scaling is not None, "prepare() first"
        i = info(node)
        flops = self.scaling.at_target(i.flops_expr)
        out_bytes = self.scaling.at_target(i.output_bytes_expr)
        moved = 2 * out_bytes + i.param_bytes  # read about as much as written, plus the weights
        seconds = max(
            flops / self.spec.peak_flops(self.dtype), moved / (self.spec.memory_bandwidth_gbs * 1e9)
        )
        fwd_ms = seconds * 1e3 + self.spec.launch_overhead_us * 1e-3
        trains = i.on_grad_path or i.param_bytes > 0 or flops > 0
        return NodeCost(fwd_ms, fwd_ms * self.bwd_factor if trains else 0.0, out_bytes if trains else 0)


def _example_sizes(gm: fx.GraphModule) -> dict[str, int]:
    """``B``/``S`` of the example the symbolic pass ran on."""
    sizes = gm.meta.get(SIZES_KEY)
    if sizes is None:
        raise TspipeError(
            "the graph has no symbolic costs; hint: run tspipe_fx.passes.annotate_symbolic first"
        )
    return dict(sizes)


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
        return NodeCost() if node.op in _NO_COST_OPS else NodeCost(1.0, 2.0, 0)
