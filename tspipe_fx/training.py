"""Training pieces shared by the reference trainer and the runtimes: micro-batches, views, EMA.

Keeping them in one place is what makes "same semantics" checkable: the reference trainer and
every runtime split batches, join outputs and update a momentum teacher with these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from tspipe_fx.errors import TspipeError

__all__ = [
    "OptimizerSpec",
    "build_optimizer",
    "ema_update",
    "join_micro",
    "parameter_names",
    "split_micro",
    "split_tree",
    "view_inputs",
]

OptimizerSpec = Callable[[list[nn.Parameter]], torch.optim.Optimizer] | torch.optim.Optimizer


def view_inputs(views: int, inputs: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The positional inputs of each view: one view is ``inputs``; two views are ``inputs[0]``
    and ``inputs[1]``, each a tensor or a tuple of the model's inputs."""
    if views == 1:
        return [tuple(inputs)]
    if len(inputs) != views:
        raise TspipeError(f"{views} views need {views} inputs (one per view), got {len(inputs)}")
    return [tuple(v) if isinstance(v, (tuple, list)) else (v,) for v in inputs]


def split_tree(tree: Any, parts: int) -> list[Any]:
    """Split every tensor leaf of ``tree`` with a batch dimension into ``parts`` chunks along
    dim 0 (``tensor_split``: the first chunks are one sample larger when the batch does not
    divide); other leaves are repeated in every part."""
    leaves, spec = tree_flatten(tree)
    chunks = [
        torch.tensor_split(x, parts) if isinstance(x, torch.Tensor) and x.dim() > 0 else [x] * parts
        for x in leaves
    ]
    return [tree_unflatten([c[i] for c in chunks], spec) for i in range(parts)]


def split_micro(
    args: Sequence[Any], kwargs: dict[str, Any], micro_batches: int
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The ``(args, kwargs)`` of each micro-batch (see :func:`split_tree`)."""
    leaves = tree_flatten((tuple(args), dict(kwargs)))[0]
    batch = next((x.shape[0] for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    if batch is None:
        raise TspipeError("the batch has no tensor with a batch dimension")
    if batch < micro_batches:
        raise TspipeError(f"a batch of {batch} samples cannot be split into {micro_batches} micro-batches")
    return split_tree((tuple(args), dict(kwargs)), micro_batches)


def join_micro(parts: Sequence[Any]) -> Any:
    """Concatenate micro-batch outputs (any pytree of tensors) along dim 0."""
    flat = [tree_flatten(p) for p in parts]
    spec = flat[0][1]
    joined = [
        torch.cat(list(leaves)) if isinstance(leaves[0], torch.Tensor) and leaves[0].dim() > 0 else leaves[0]
        for leaves in zip(*(f[0] for f in flat), strict=True)
    ]
    return tree_unflatten(joined, spec)


@torch.no_grad()
def ema_update(
    teacher: Iterable[tuple[str, torch.Tensor]], student: Mapping[str, torch.Tensor], momentum: float
) -> None:
    """``teacher <- m * teacher + (1 - m) * student``, matched by name (floating tensors only;
    integer buffers such as BatchNorm's batch counter are copied)."""
    for name, t in teacher:
        s = student[name]
        if t.is_floating_point():
            t.mul_(momentum).add_(s.to(t.device), alpha=1 - momentum)
        else:
            t.copy_(s)


def parameter_names(module: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in ``module`` (a tied weight has several)."""
    names: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return names


def build_optimizer(
    spec: OptimizerSpec, params: dict[str, nn.Parameter], originals: dict[int, list[str]]
) -> torch.optim.Optimizer | None:
    """An optimizer over ``params`` (name -> tensor): a factory is called on them; an optimizer
    instance is rebuilt with the same class, and each of its param groups keeps its options,
    restricted to the parameters here (``originals`` maps id(original) -> its names; a tied
    weight has several). None where the instance holds none of them."""
    if isinstance(spec, torch.optim.Optimizer):
        groups = []
        for group in spec.param_groups:
            names = [next((n for n in originals.get(id(p), []) if n in params), "" if id(p) in originals else None)
                     for p in group["params"]]  # fmt: skip
            unknown = sum(n is None for n in names)
            if unknown:
                raise TspipeError(
                    f"the optimizer holds {unknown} parameters that are not the student's; hint: build it "
                    "over student.parameters(), or pass a factory (lambda params: SGD(params, lr=0.1))"
                )
            mine = [params[n] for n in names if n in params]
            if mine:
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine})
        if not groups:
            return None
        return type(spec)(groups)  # type: ignore[call-arg]  # each group carries every option
    if callable(spec):
        opt = spec(list(params.values()))
        if not isinstance(opt, torch.optim.Optimizer):
            raise TspipeError(
                f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer"
            )
        return opt
    raise TspipeError(
        f"optimizer must be a torch.optim.Optimizer or a factory params -> optimizer, got {type(spec).__name__}"
    )
