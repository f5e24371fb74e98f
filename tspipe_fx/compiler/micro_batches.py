"""compile's choice of the number of micro-batches M, with the partition and the schedule.

More micro-batches shorten the pipeline's fill and drain but make every task smaller, and
smaller tasks run less efficiently (the cost models' per-op launch term, measured scaling), so
M is a trade the simulator decides: for each candidate M the graphs are costed at that
micro-batch, partitioned, and the synthesized (``auto``) schedule simulated on the stage costs;
the shortest period wins. A candidate whose partition does not fit in memory is skipped.
Under ``refine`` the profiles' linear costs are first carried to each candidate's micro-batch
as measured (:func:`scaled`, :mod:`tspipe_fx.cost.micro_scaling`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tspipe_fx.compiler.partitioner import Partitioner
from tspipe_fx.cost.micro_scaling import Scaling, measured_scaling
from tspipe_fx.cost.model import NodeCost
from tspipe_fx.cost.stage_times import at_batch
from tspipe_fx.partition.objective import schedule_costs
from tspipe_fx.partition.problem import Partition, PartitionError
from tspipe_fx.passes.chain import GraphChain
from tspipe_fx.passes.symbolic import input_sizes
from tspipe_fx.schedule.costs import StageCosts
from tspipe_fx.schedule.generators import make_schedule
from tspipe_fx.schedule.simulator import simulate_costs
from tspipe_fx.tracing import CapturedModel

__all__ = ["Partitioned", "candidates", "fastest", "measured_at", "scaled"]


@dataclass
class Partitioned:
    """One candidate M: the graphs' chains and costs at its micro-batch, and its partition."""

    m: int
    micro: dict[str, int]
    t_micro: dict[str, int]
    s_gc: GraphChain
    t_gc: GraphChain
    partitioner: Partitioner
    s_costs: list[Any]
    t_costs: list[Any]
    part: Partition
    recompute: tuple[str, ...] = ()  # per device, the recompute policy it was partitioned under

    def stage_costs(self) -> StageCosts:
        """Per device, one micro-batch's task times on this partition (links included)."""
        problem = self.partitioner.problem(self.s_costs, self.t_costs)
        return schedule_costs(problem, self.part.student_cuts, self.part.teacher_cuts)


def candidates(n_stages: int, batch: int) -> list[int]:
    """M = N, 2N and 4N micro-batches, as far as the batch gives each two samples or more (a
    micro-batch of one sample cannot train a BatchNorm1d, and runs every kernel at its least
    efficient); N itself always (as many as the batch has samples for)."""
    more = {m for m in (2 * n_stages, 4 * n_stages) if batch // m >= 2}
    return sorted({min(n_stages, batch)} | more)


def fastest(
    partition_at: Callable[[int], Partitioned],
    ms: Sequence[int],
    *,
    views: int,
    mode: str,
    staleness: int,
    loss: str,
) -> tuple[Partitioned, float]:
    """The candidate whose synthesized schedule has the shortest simulated period, and that period."""
    best: tuple[float, Partitioned] | None = None
    error: PartitionError | None = None
    for m in ms:
        try:
            at = partition_at(m)
        except PartitionError as e:  # e.g. its activations do not fit in memory
            error = e
            continue
        costs = at.stage_costs()
        s = make_schedule("auto", costs.n_stages, m, views=views, mode=mode, staleness=staleness, loss=loss,
                          costs=costs, n_batches=6)  # fmt: skip
        period = simulate_costs(s, costs).period
        if best is None or period < best[0] * (1 - 1e-9):
            best = (period, at)
    if best is None:
        assert error is not None
        raise error
    return best[1], best[0]


def measured_at(
    captured: tuple[CapturedModel, CapturedModel],
    flat: tuple[Sequence[Any], Sequence[Any]],
    batch: int,
    ms: Sequence[int],
    device: torch.device,
) -> dict[int, Scaling]:
    """Per candidate M, the measured scaling of its micro-batch against the example batch (none
    where a model was captured for its example batch only)."""
    if not all(c.dynamic_batch for c in captured):
        return {}
    example = input_sizes(flat[0]).get("B", 1)
    sizes = {m: math.ceil(batch / m) for m in ms}
    by_size = measured_scaling(
        captured[0].graph_module,
        captured[1].graph_module,
        lambda b: (at_batch(flat[0], example, b), at_batch(flat[1], example, b)),
        example,
        sorted(set(sizes.values())),
        device,
    )
    return {m: by_size[b] for m, b in sizes.items()}


def scaled(
    costs: tuple[list[NodeCost], list[NodeCost]], scaling: Scaling | None
) -> tuple[list[NodeCost], list[NodeCost]]:
    """Both graphs' node costs carried by ``scaling`` (as they are without one)."""
    if scaling is None:
        return costs
    f = scaling
    return (
        [c.scaled(f.student_fwd, f.student_bwd) for c in costs[0]],
        [c.scaled(f.teacher_fwd, f.teacher_fwd) for c in costs[1]],
    )
