"""What one loss call gets: the micro-batches it covers, joined per view, and its weight.

A loss per micro-batch (``loss="micro"`` or ``"micro_full_teacher"``) is a mean over samples: the
term of micro-batch ``m`` weighs its share of the batch, so the terms add up to the batch's loss
(:func:`micro_term`, the rule both the runtimes and the reference trainer apply). The last stage
gathers the outputs a call covers (:func:`gather_outputs`): the student's as leaves that take the
loss's gradient, the teacher's as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tspipe_fx.runtime.batches import split_tree

__all__ = ["gather_outputs", "micro_term"]

Key = tuple[int, int, int]  # (batch, view, micro-batch)


def micro_term(
    sizes: Sequence[int], target: Any, micro: int, full_teacher: bool
) -> tuple[float, Any, dict[str, Any]]:
    """Micro-batch ``micro``'s term: its weight (its share of the batch), its rows of ``target``
    and, against the whole batch's teacher outputs, ``rows=`` (which rows of the batch its
    queries are: InfoNCE's positives)."""
    extra: dict[str, Any] = {}
    if full_teacher:
        start = sum(sizes[:micro])
        extra["rows"] = slice(start, start + sizes[micro])
    return sizes[micro] / sum(sizes), split_tree(target, len(sizes))[micro], extra


def gather_outputs(
    student_out: dict[Key, tuple[Any, ...]],
    teacher_out: dict[Key, tuple[Any, ...]],
    batch: int,
    micro: Sequence[tuple[int, int]],
    views: int,
    *,
    teacher_parts: int,
    full_teacher: int | None,
) -> tuple[list[list[Any]], list[list[Any]], dict[tuple[int, int, int], torch.Tensor]]:
    """Per view, the flat student and teacher outputs of the ``(view, micro)`` pairs a loss call
    covers, in micro-batch order, and the student leaves ``(view, micro, output) -> leaf``.

    The student's are taken out of ``student_out``; the teacher micro-batches that slice each
    student micro-batch (``teacher_parts`` each) out of ``teacher_out``, or, with
    ``full_teacher`` (the number of teacher micro-batches of the batch), all of them, left for
    the batch's other terms.
    """
    per_view_s: list[list[Any]] = []
    per_view_t: list[list[Any]] = []
    leaves: dict[tuple[int, int, int], torch.Tensor] = {}
    for v in range(views):
        s_parts, t_parts = [], []
        for m in (m for vv, m in micro if vv == v):
            outs = []
            for i, o in enumerate(student_out.pop((batch, v, m))):
                if isinstance(o, torch.Tensor) and o.requires_grad:
                    o = leaves[(v, m, i)] = o.detach().requires_grad_()
                outs.append(o)
            s_parts.append(outs)
            if full_teacher is None:
                k = teacher_parts
                t_parts += [list(teacher_out.pop((batch, v, i))) for i in range(m * k, (m + 1) * k)]
        if full_teacher is not None:
            t_parts = [list(teacher_out[(batch, v, i)]) for i in range(full_teacher)]
        per_view_s.append(s_parts)
        per_view_t.append(t_parts)
    return per_view_s, per_view_t, leaves
