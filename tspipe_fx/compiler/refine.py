"""compile's ``refine=N``: time the partition's stages whole, scale each stage's node costs to
what was measured, and partition again, until the cuts repeat (see
:mod:`tspipe_fx.cost.stage_times` for why stages run whole cost what their nodes do not)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from tspipe_fx.compiler.partitioner import Partitioner, cuts_of
from tspipe_fx.cost.model import NodeCost
from tspipe_fx.cost.stage_times import time_stages
from tspipe_fx.partition.problem import Partition
from tspipe_fx.passes.split import split

__all__ = ["ratios", "refine"]


def refine(
    part: Partition,
    partitioner: Partitioner,
    rounds: int,
    costs: tuple[list[NodeCost], list[NodeCost]],
    inputs: tuple[list[Any], list[Any]],
    device: torch.device,
) -> tuple[Partition, list[NodeCost], list[NodeCost], Partitioner]:
    """Up to ``rounds`` rounds from ``part``; returns the partition whose measured loads were the
    most even, scored on the last rescaled costs, those costs, and the partitioner that knows its
    stages' split backward as timed (:meth:`~tspipe_fx.cost.stage_times.StageTimes.split_shares`)."""
    s_gc, t_gc = partitioner.student, partitioner.teacher
    s_costs, t_costs = costs
    measured: list[tuple[Partition, Partitioner]] = []
    for _ in range(rounds):
        times = time_stages(split(s_gc, part.student_cuts), split(t_gc, part.teacher_cuts), *inputs, device)
        # The split backward as timed on these stages; on other cuts, taken to cost alike per stage.
        partitioner = dataclasses.replace(partitioner, split_shares=times.split_shares())
        s_pred = s_gc.to_partition_chain(s_costs).stage_sums(part.student_cuts)
        t_pred = t_gc.to_partition_chain(t_costs).stage_sums(part.teacher_cuts)
        s_costs = s_gc.rescaled(
            s_costs,
            part.student_cuts,
            ratios(times.student_fwd_ms, [s.fwd_ms for s in s_pred]),
            ratios(times.student_bwd_ms, [s.bwd_ms for s in s_pred]),
        )
        t_costs = t_gc.rescaled(
            t_costs,
            part.teacher_cuts,
            ratios(times.teacher_fwd_ms, [t.fwd_ms for t in t_pred]),
            [1.0] * len(t_pred),
        )
        # On the rescaled costs, this partition's compute is what was measured.
        measured.append((partitioner.at(s_costs, t_costs, cuts_of(part)), partitioner))
        if partitioner.fixed is not None:
            break
        again = partitioner.best(s_costs, t_costs)
        if any(cuts_of(again) == cuts_of(p) for p, _ in measured):
            break
        part = again
    # Rounds run at different times, and a noisy machine's speed drifts between them; within a
    # round every stage saw the same machine, so partitions compare by their measured imbalance.
    best, timed = min(measured, key=lambda m: m[0].period_ms * len(m[0].loads_ms) / sum(m[0].loads_ms))
    return timed.at(s_costs, t_costs, cuts_of(best)), s_costs, t_costs, timed


def ratios(measured: Sequence[float], predicted: Sequence[float]) -> list[float]:
    """Per stage: measured (or recorded) over predicted (1 where nothing was predicted)."""
    return [mv / pv if pv > 0 else 1.0 for mv, pv in zip(measured, predicted, strict=True)]
