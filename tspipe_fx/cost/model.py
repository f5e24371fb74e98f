"""Pluggable cost models: node -> (forward ms, backward ms, activation memory bytes).

One small base class, a function adapter and two combinators, after
``torch/fx/passes/operator_support.py`` (``OperatorSupportBase``, ``create_op_support``,
``chain``):

* :class:`CostModel` - subclass and implement :meth:`CostModel.node_cost`;
* :func:`cost_model` - turn a plain function ``node -> NodeCost`` into one;
* :func:`scale` and :func:`total` (also ``model * 2.0`` and ``a + b``).

Built-ins (:mod:`tspipe_fx.cost.builtin`): :class:`MeasuredCost` (a :class:`~tspipe_fx.Profile`),
:class:`RooflineCost` (FLOPs and bytes against a :class:`~tspipe_fx.cost.devices.DeviceSpec`),
:class:`ParamCountCost` (DeepSpeed's ``partition_method="parameters"``) and
:class:`UniformCost` (``"uniform"``).

Cost models read what the passes wrote in ``node.meta["tspipe"]`` (:mod:`tspipe_fx.passes.meta`).
A cost is for one micro-batch of the plan being compiled: :func:`tspipe_fx.compile` passes its
sizes to :meth:`CostModel.graph_costs` (``{"B": 16}``, or ``{"B": 16, "S": 128}``), the
built-ins scale what was measured or counted at the example's size to them through the symbolic
FLOPs and bytes expressions, and :func:`flops` and :func:`output_bytes` give a custom model the
same figures while it is asked (``info(node).fwd_flops`` is at the example's size).
``batch_size=`` (and ``seq_len=``) on a built-in fixes the size instead.
"""

from __future__ import annotations

import contextvars
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from tspipe_fx.errors import TspipeError
from tspipe_fx.passes.meta import info
from tspipe_fx.passes.symbolic import SIZES_KEY, evaluate

__all__ = [
    "NO_COST_OPS",
    "CostModel",
    "NodeCost",
    "cost_model",
    "example_sizes",
    "flops",
    "output_bytes",
    "scale",
    "total",
]

NO_COST_OPS = ("placeholder", "output", "get_attr")
# The sizes the graph being costed is asked at, while graph_costs runs (flops() reads them).
_ASKED: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("tspipe_asked", default=None)


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

    def prepare(self, gm: fx.GraphModule, sizes: dict[str, int]) -> None:  # noqa: B027 - optional hook
        """Called once per graph before :meth:`node_cost`, with the sizes it is costed at: check
        the graph fits this model."""

    def graph_costs(self, gm: fx.GraphModule, sizes: dict[str, int] | None = None) -> list[NodeCost]:
        """One cost per node, in graph order, for inputs of ``sizes`` (``{"B": 16}``; default:
        the example the symbolic pass ran on)."""
        asked = dict(sizes) if sizes is not None else example_sizes(gm, required=False)
        token = _ASKED.set(asked)
        try:
            self.prepare(gm, asked)
            return self._costs(gm)
        finally:
            _ASKED.reset(token)

    def _costs(self, gm: fx.GraphModule) -> list[NodeCost]:
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

    def prepare(self, gm: fx.GraphModule, sizes: dict[str, int]) -> None:
        self.inner.prepare(gm, sizes)

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

    def prepare(self, gm: fx.GraphModule, sizes: dict[str, int]) -> None:
        for m in self.models:
            m.prepare(gm, sizes)

    def node_cost(self, node: fx.Node) -> NodeCost:
        return functools.reduce(NodeCost.__add__, (m.node_cost(node) for m in self.models), NodeCost())


def total(*models: CostModel) -> CostModel:
    """The sum of several cost models (compute from one, communication overhead from another)."""
    if not models or not all(isinstance(m, CostModel) for m in models):
        raise TspipeError(f"total() needs CostModel arguments, got {[type(m).__name__ for m in models]}")
    return _Sum(models)


def example_sizes(gm: fx.GraphModule, *, required: bool = True) -> dict[str, int]:
    """``B``/``S`` of the example the symbolic pass ran on (``{}`` where it has not run, unless
    ``required``)."""
    sizes = gm.meta.get(SIZES_KEY)
    if sizes is None and required:
        raise TspipeError(
            "the graph has no symbolic costs; hint: run tspipe_fx.passes.annotate_symbolic first"
        )
    return dict(sizes or {})


def flops(node: fx.Node, sizes: dict[str, int] | None = None) -> int:
    """The node's forward FLOPs at ``sizes`` (default: the sizes its graph is being costed at,
    one micro-batch of the plan inside compile, else the example's)."""
    return evaluate(info(node).flops_expr, _sizes(node, sizes))


def output_bytes(node: fx.Node, sizes: dict[str, int] | None = None) -> int:
    """The bytes of the node's outputs at ``sizes`` (default as for :func:`flops`)."""
    return evaluate(info(node).output_bytes_expr, _sizes(node, sizes))


def _sizes(node: fx.Node, sizes: dict[str, int] | None) -> dict[str, int]:
    if sizes is not None:
        return sizes
    asked = _ASKED.get()
    if asked is not None:
        return asked
    gm = node.graph.owning_module
    return example_sizes(gm, required=False) if isinstance(gm, fx.GraphModule) else {}
