"""A stage's backward in two halves (zero-bubble, Qi et al. 2023): input gradients now, weight
gradients later.

:func:`input_gradients` runs autograd from the stage's outputs to its inputs only, so the
previous stage can go on; on the way it keeps, at every node where a weight's gradient path
joins the input path (a matmul's backward, say), the gradient that arrived there.
:func:`weight_gradients` later starts autograd from those nodes with those gradients and stops
at the weights: no gradient is computed twice (the approach of torch.distributed.pipelining's
zero-bubble schedules). A weight whose path never meets the inputs' (every weight of the first
stage, whose inputs need no gradient) takes its gradient from the outputs in the second half.

The deferred work is the matmuls' (Qi et al.'s W): a vector weight (a bias, a norm's scale and
shift) whose node sits on the input path takes its gradient in the first half, into ``.grad``.
There it is a reduction of a gradient that half computes anyway (BatchNorm's input gradient
needs the very sums its weights' gradients are); deferred, the node's backward would run twice.
On this project's CPU that pass is small: the CPU benchmark's second ResNet-18 stage took its
split backward in 1.029x the whole one's time with it, 1.025x without (medians of 30 pairs).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node

__all__ = ["WeightWork", "input_gradients", "weight_gradients"]


def _node(t: torch.Tensor) -> Node | None:
    """The autograd node a tensor's gradient enters (a leaf's accumulator, made on demand)."""
    if t.grad_fn is not None:
        return t.grad_fn
    if not t.requires_grad:
        return None
    return t.view_as(t).grad_fn.next_functions[0][0]  # type: ignore[union-attr]


@dataclass
class WeightWork:
    """What the weight half needs: per group of weights, the nodes where their paths join the
    input path and the gradients that arrived there; the weights reached from the outputs only."""

    groups: list[tuple[list[torch.nn.Parameter], list[Node], list[tuple[torch.Tensor | None, ...]]]]
    direct: list[torch.nn.Parameter]
    outputs: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)


def input_gradients(
    outputs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.nn.Parameter],
) -> tuple[list[torch.Tensor | None], WeightWork]:
    """The gradients of ``inputs`` (None where one has none), and the weight half's work; the
    gradients of the vector weights on the input path are accumulated into ``.grad`` already."""
    roots = [n for n in map(_node, outputs) if n is not None]
    above: dict[Node, list[Node]] = collections.defaultdict(list)  # node -> nodes nearer the outputs
    queue, seen = collections.deque(roots), set(roots)
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is not None:
                above[child].append(node)
                if child not in seen:
                    seen.add(child)
                    queue.append(child)

    def closure(starts: list[Node], stop: set[Node]) -> tuple[set[Node], set[Node]]:
        """Nodes reached walking toward the outputs, and the ``stop`` nodes met (not passed)."""
        inside, met, todo = set(starts), set(), collections.deque(starts)
        while todo:
            for parent in above[todo.popleft()]:
                if parent in stop:
                    met.add(parent)
                elif parent not in inside:
                    inside.add(parent)
                    todo.append(parent)
        return inside, met

    wanted = [x for x in inputs if x.requires_grad]
    if not wanted:  # (a first stage: nothing to send back, and every weight is the second half's)
        used = [p for p in params if _node(p) in seen]
        return [None] * len(inputs), WeightWork(
            [], used, list(outputs) if used else [], list(grads) if used else []
        )
    input_path, _ = closure([n for n in map(_node, wanted) if n is not None], set())
    by_join: dict[frozenset[Node], list[torch.nn.Parameter]] = {}
    direct, now = [], []
    for p in params:
        acc = _node(p)
        if acc is None or acc not in seen:
            continue  # not used by these outputs
        if p.dim() <= 1 and all(n in input_path for n in above[acc]):
            now.append(p)  # a vector whose nodes are on the input path: its gradient comes with it
            continue
        _, met = closure([acc], input_path)
        if met:
            by_join.setdefault(frozenset(met), []).append(p)
        else:
            direct.append(p)
    captured: dict[Node, tuple[torch.Tensor | None, ...]] = {}
    handles = []
    for joins in by_join:
        for n in joins:
            if n not in captured:
                captured[n] = ()
                handles.append(n.register_prehook(lambda g, n=n: captured.__setitem__(n, tuple(g))))
    try:
        got = torch.autograd.grad(
            list(outputs), [*wanted, *now], list(grads), retain_graph=True, allow_unused=True
        )
    finally:
        for h in handles:
            h.remove()
    _accumulate(now, got[len(wanted) :])
    it = iter(got)
    dinputs = [next(it) if x.requires_grad else None for x in inputs]
    groups = [(ps, list(joins), [captured[n] for n in joins]) for joins, ps in by_join.items()]
    return dinputs, WeightWork(groups, direct, list(outputs) if direct else [], list(grads) if direct else [])


def weight_gradients(work: WeightWork, retain_graph: bool = False) -> None:
    """Accumulate the weights' gradients into ``.grad``; the stage's graph is released after
    (kept with ``retain_graph``)."""
    for i, (params, joins, arrived) in enumerate(work.groups):
        edges, seeds = [], []
        for n, g in zip(joins, arrived, strict=True):
            for k, x in enumerate(g):
                if x is not None:
                    edges.append(GradientEdge(n, k))
                    seeds.append(x)
        if not edges:
            continue
        # A join below another would also receive the upper one's gradient: pin each to its own.
        handles = (
            [n.register_prehook(lambda _, g=g: g) for n, g in zip(joins, arrived, strict=True)]
            if len(joins) > 1
            else []
        )
        try:
            keep = retain_graph or bool(work.direct) or i < len(work.groups) - 1
            got = torch.autograd.grad(edges, [GradientEdge(_node(p), 0) for p in params], seeds,  # type: ignore[arg-type]
                                      retain_graph=keep, allow_unused=True)  # fmt: skip
        finally:
            for h in handles:
                h.remove()
        _accumulate(params, got)
    if work.direct:
        torch.autograd.backward(work.outputs, work.grads, inputs=work.direct, retain_graph=retain_graph)


def _accumulate(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
    for p, dw in zip(params, grads, strict=True):
        if dw is not None:
            p.grad = dw if p.grad is None else p.grad + dw
