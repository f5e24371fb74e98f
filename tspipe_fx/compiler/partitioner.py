"""Costs -> a partition, with everything else fixed once: the graphs' chains, the devices, the
micro-batches, the cut constraints (a saved plan, a manual balance, a momentum teacher's
mirrored pairs) and the schedule the partition is polished for.

compile asks it once for the best partition; the refine step asks again on rescaled costs, and
the baselines ask it to score other policies' cuts under the same model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tspipe_fx.cost.builtin import ParamCountCost, UniformCost
from tspipe_fx.cost.model import NodeCost
from tspipe_fx.partition.balance import fastest
from tspipe_fx.partition.objective import evaluate
from tspipe_fx.partition.polisher import polish
from tspipe_fx.partition.problem import Device, Partition, PartitionError, Problem
from tspipe_fx.partition.solver import solve
from tspipe_fx.passes.chain import GraphChain
from tspipe_fx.schedule.task import Schedule

__all__ = ["Cuts", "Partitioner", "cuts_of"]

Cuts = tuple[list[int], list[int]]  # student and teacher chain positions


def cuts_of(part: Partition) -> Cuts:
    """A partition's cut positions, student and teacher."""
    return list(part.student_cuts), list(part.teacher_cuts)


@dataclass(frozen=True)
class Partitioner:
    """The partition problem of one compile, less the costs (see the module docstring)."""

    student: GraphChain
    teacher: GraphChain
    devices: tuple[Device, ...]
    micro_batches: int
    optimizer_factor: float
    fixed: Cuts | None = None  # cuts given (a saved plan, a manual balance): only scored
    pairs: tuple[tuple[int, int], ...] | None = None  # momentum: (student, teacher) positions cut alike
    schedule: Schedule | None = None  # choose and polish for this schedule's simulated period (None: min-max)
    synthesize: bool = False  # the plan's schedule is synthesized for its costs (schedule: the skeleton)
    teacher_parts: int = 1  # (a synthesized schedule's teacher micro-batches per student micro-batch)
    activation_scale: float = 1.0  # activations in the compute dtype: 0.5 for bf16 and fp16
    recompute_share: tuple[float, ...] = ()  # per device, the student forwards its recompute replays
    split_shares: tuple[tuple[float, float], ...] = ()  # per device, the split backward as timed (refine)

    def problem(
        self, sc: Sequence[NodeCost], tc: Sequence[NodeCost], cuts: Cuts | None = None, *, blind: bool = False
    ) -> Problem:
        """The problem on costs ``sc``/``tc``: over the candidate cuts (the mirrored pairs in
        momentum mode), or over ``cuts`` alone; ``blind``: on equal devices without links or
        memory limits (how a simple policy sees them)."""
        mirror = False
        if cuts is None and self.pairs is not None:  # momentum: the mirrored pairs are the candidates
            cuts, mirror = ([p for p, _ in self.pairs], [q for _, q in self.pairs]), True
        s_cuts, t_cuts = cuts if cuts is not None else (None, None)
        return Problem(
            student=self.student.to_partition_chain(sc, s_cuts, activation_scale=self.activation_scale),
            teacher=self.teacher.to_partition_chain(tc, t_cuts, activation_scale=self.activation_scale),
            devices=tuple(Device() for _ in self.devices) if blind else self.devices,
            micro_batches=self.micro_batches,
            optimizer_factor=self.optimizer_factor,
            mirror=mirror,
            recompute_share=() if blind else self.recompute_share,
            split_shares=() if blind else self.split_shares,
        )

    def at(self, sc: Sequence[NodeCost], tc: Sequence[NodeCost], cuts: Cuts) -> Partition:
        """The partition at ``cuts``, scored on costs ``sc``/``tc``."""
        return evaluate(self.problem(sc, tc, cuts), *cuts)

    def best(self, sc: Sequence[NodeCost], tc: Sequence[NodeCost]) -> Partition:
        """The best partition on costs ``sc``/``tc`` (the fixed cuts scored, if given).

        With a schedule, the min-max partition and the ones with the student's stages capped
        (:mod:`tspipe_fx.partition.balance`) are simulated under it and the fastest is taken: a
        synthesized schedule ranks them by its quick estimate and takes the best (synthesized in
        full for the plan); a fixed schedule's is polished further (:mod:`tspipe_fx.partition.polisher`). Both
        trade the busiest device's load for a shorter period, but never past the load of the
        best simple policy's partition: a plan never loses to a baseline scored on its own costs.
        """
        if self.fixed is not None:
            return self.at(sc, tc, self.fixed)
        problem = self.problem(sc, tc)
        best = solve(problem)
        if self.schedule is None:
            return best
        cap = min((p.period_ms for _, p in self.baselines(sc, tc)), default=math.inf)
        chosen = fastest(problem, best, self.schedule, synthesize=self.synthesize, teacher_parts=self.teacher_parts,
                         max_load_ms=cap)  # fmt: skip
        return chosen if self.synthesize else polish(problem, chosen, self.schedule, max_load_ms=cap)

    def baselines(self, sc: Sequence[NodeCost], tc: Sequence[NodeCost]) -> list[tuple[str, Partition]]:
        """Simple policies' partitions scored on costs ``sc``/``tc`` (what the cost model bought).

        Each policy balances its own proxy cost (node count, parameter bytes) and knows nothing
        of links or memory, as in the libraries that use it; its cuts are then scored like ours.
        """
        out = []
        for name, policy in (("equal nodes", UniformCost()), ("equal parameters", ParamCountCost())):
            proxy = self.problem(
                policy.graph_costs(self.student.gm), policy.graph_costs(self.teacher.gm), blind=True
            )
            try:
                cuts = solve(proxy)
            except PartitionError:
                continue
            out.append((name, self.at(sc, tc, (list(cuts.student_cuts), list(cuts.teacher_cuts)))))
        return out
