"""Batches cut and joined: views, micro-batches, outputs joined back, moved between devices.

Keeping them in one place is what makes "same semantics" checkable: the reference trainer and
every runtime split batches and join outputs with these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from tspipe_fx.errors import TspipeError
from tspipe_fx.stage import positional_args

__all__ = [
    "Fed",
    "batch_size",
    "fed_batch",
    "join_micro",
    "split_micro",
    "split_tree",
    "to_device",
    "tree_to_device",
    "view_inputs",
]


class Fed(NamedTuple):
    """One batch as the runtimes hold it: each model's inputs per view and micro-batch
    (``student_args[v][m]``), and the target. A teacher fed the student's inputs shares them."""

    student_args: list[list[tuple[Any, ...]]]
    student_kwargs: list[list[dict[str, Any]]]
    target: Any
    teacher_args: list[list[tuple[Any, ...]]]
    teacher_kwargs: list[list[dict[str, Any]]]

    def inputs(self, teacher: bool, view: int, micro: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The ``(args, kwargs)`` of one model's micro-batch."""
        if teacher:
            return self.teacher_args[view][micro], self.teacher_kwargs[view][micro]
        return self.student_args[view][micro], self.student_kwargs[view][micro]


def fed_batch(
    views: int,
    micro_batches: int,
    inputs: Sequence[Any],
    kwargs: dict[str, Any],
    target: Any,
    teacher_inputs: Any = None,
    teacher_kwargs: dict[str, Any] | None = None,
    teacher_parts: int = 1,
) -> Fed:
    """Cut a batch into views and micro-batches. ``teacher_inputs`` (a tensor or a tuple of
    positional arguments) and ``teacher_kwargs`` are the teacher's own call for the same samples
    (neither: the student's). ``teacher_parts``: the teacher runs each student micro-batch as
    that many smaller ones (slices of its rows, in order)."""
    teacher = None
    if teacher_inputs is not None or teacher_kwargs is not None:
        positional = () if teacher_inputs is None else teacher_inputs
        if not isinstance(positional, (torch.Tensor, tuple, list)) or not isinstance(
            teacher_kwargs or {}, dict
        ):
            raise TspipeError(
                f"teacher_inputs must be a tensor or a tuple of the teacher's positional inputs and "
                f"teacher_kwargs a dict, got {type(positional).__name__} and {type(teacher_kwargs).__name__}"
            )
        teacher = (
            positional_args(positional),
            teacher_kwargs or {},
        )
    cut = []
    for positional, keywords in ((inputs, kwargs),) if teacher is None else ((inputs, kwargs), teacher):
        per_view = [split_micro(v, keywords, micro_batches) for v in view_inputs(views, positional)]
        cut.append(
            ([[a for a, _ in micro] for micro in per_view], [[k for _, k in micro] for micro in per_view])
        )
    if teacher is not None:
        sizes = [sum(batch_size((a, k)) for a, k in zip(args[0], kws[0], strict=True)) for args, kws in cut]
        if sizes[0] != sizes[1]:
            raise TspipeError(
                f"the teacher's inputs hold {sizes[1]} samples and the student's {sizes[0]}; hint: "
                "teacher_inputs are the same samples as the student's, prepared for the teacher"
            )
    (s_args, s_kwargs), (t_args, t_kwargs) = cut[0], cut[-1]
    if teacher_parts > 1:
        finer = [[], []]  # type: list[list[Any]]
        for args, kws in zip(t_args, t_kwargs, strict=True):
            parts = []
            for a, k in zip(args, kws, strict=True):
                if batch_size((a, k)) < teacher_parts:
                    raise TspipeError(
                        f"a micro-batch of {batch_size((a, k))} samples cannot be cut into teacher_parts="
                        f"{teacher_parts} teacher micro-batches; hint: a larger batch, or fewer parts"
                    )
                parts += split_micro(a, k, teacher_parts)
            finer[0].append([a for a, _ in parts])
            finer[1].append([k for _, k in parts])
        t_args, t_kwargs = finer
    return Fed(s_args, s_kwargs, target, t_args, t_kwargs)


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


def batch_size(args: tuple[Any, ...]) -> int:
    """Samples in a micro-batch: the first dimension of its first tensor with one (1 if none)."""
    leaves = [x for x in tree_flatten(args)[0] if isinstance(x, torch.Tensor) and x.dim() > 0]
    return int(leaves[0].shape[0]) if leaves else 1


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor moved to ``device``; anything else as it is."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


def tree_to_device(tree: Any, device: torch.device) -> Any:
    """Every tensor leaf of ``tree`` moved to ``device``."""
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([to_device(x, device) for x in leaves], spec)
