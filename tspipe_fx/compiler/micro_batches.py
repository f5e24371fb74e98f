"""compile's choice of the number of micro-batches M, with the partition and the schedule.

More micro-batches shorten the pipeline's fill and drain but make every task smaller, and
smaller tasks run less efficiently (the cost models' per-op launch term, measured scaling), so
M is a trade the simulator decides: for each candidate M the graphs are costed at that
micro-batch, partitioned, and the synthesized (``auto``) schedule simulated on the stage costs;
the shortest period wins. A candidate whose partition does not fit in memory is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tspipe_fx.compiler.partitioner import Partitioner
from tspipe_fx.partition.objective import schedule_costs
from tspipe_fx.partition.problem import Partition, PartitionError
from tspipe_fx.passes.chain import GraphChain
from tspipe_fx.schedule.costs import StageCosts
from tspipe_fx.schedule.generators import make_schedule
from tspipe_fx.schedule.simulator import simulate_costs

__all__ = ["Partitioned", "candidates", "fastest"]


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
