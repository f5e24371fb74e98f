"""Schedule polish: from the min-max partition to a neighbour with a shorter simulated period.

The partitioner minimises the busiest device's load; a schedule adds waits the load does not
see. Under ``tspipe`` on two devices, device 0 runs its student forwards, then the next batch's
teacher forwards, then waits for the first gradient, which device 1 sends after its own
forward, loss and backward of that micro-batch: a partition that leaves little teacher on
device 0 idles it there, however even the loads. Many partitions share the optimum's load
within a few percent; :func:`polish` walks from the optimum to neighbouring cuts (every cut
moved a few candidate positions either way) while the simulated period of the schedule
(:mod:`tspipe_fx.schedule.simulator`, the same per-stage costs and links) gets shorter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from tspipe_fx.partition.objective import evaluate, fits, schedule_costs
from tspipe_fx.partition.problem import Partition, PartitionError, Problem
from tspipe_fx.schedule.simulator import simulate_costs
from tspipe_fx.schedule.task import Schedule

__all__ = ["polish", "simulated_period"]


def simulated_period(
    problem: Problem, student_cuts: Sequence[int], teacher_cuts: Sequence[int], schedule: Schedule
) -> float:
    """The steady-state period of ``schedule`` on the stages at these cuts (ms per batch)."""
    if schedule.n_stages != len(problem.devices) or schedule.micro_batches != problem.micro_batches:
        raise PartitionError(
            f"the schedule has {schedule.n_stages} stages and {schedule.micro_batches} micro-batches, the "
            f"problem {len(problem.devices)} and {problem.micro_batches}"
        )
    return simulate_costs(schedule, schedule_costs(problem, student_cuts, teacher_cuts)).period


def polish(
    problem: Problem,
    start: Partition,
    schedule: Schedule,
    *,
    budget: int = 400,
    max_load_ms: float = math.inf,
) -> Partition:
    """From ``start``, downhill to a partition with a shorter simulated period of ``schedule``
    (first improvement among neighbouring cuts; at most ``budget`` simulations; memory limits
    kept; ties broken by the load). No partition whose busiest device's load exceeds
    ``max_load_ms`` is taken (compile caps it at the best simple policy's)."""
    s_pos = [p for p, _ in problem.student.cuts]
    t_pos = [p for p, _ in problem.teacher.cuts] if problem.teacher is not None else []
    has_t = bool(t_pos) and bool(start.teacher_cuts)
    State = tuple[tuple[int, ...], tuple[int, ...]]

    def score(state: State) -> tuple[float, float] | None:
        sc = [s_pos[i] for i in state[0]]
        tc = [t_pos[i] for i in state[1]]
        part = evaluate(problem, sc, tc)
        if not fits(problem, part) or part.period_ms > max_load_ms * (1 + 1e-12):
            return None
        return simulated_period(problem, sc, tc, schedule), part.period_ms

    def moves(state: State) -> list[State]:
        """Every boundary's student and teacher cuts moved alone or together (work shifted one way
        in the student and back in the teacher keeps the loads even); small steps first."""
        steps = (0, -1, 1, -2, 2, -4, 4)
        pairs = [
            (ds, dt) for ds in steps for dt in (steps if has_t and not problem.mirror else (0,)) if ds or dt
        ]
        pairs.sort(key=lambda d: abs(d[0]) + abs(d[1]))
        out = []
        for k in range(len(state[0])):
            for ds, dt in pairs:
                new = [list(state[0]), list(state[1])]
                new[0][k] += ds
                if has_t:
                    new[1][k] += ds if problem.mirror else dt
                if all(
                    _increasing(idx, len(pos)) for idx, pos in zip(new, (s_pos, t_pos), strict=True) if idx
                ):
                    out.append((tuple(new[0]), tuple(new[1])))
        return out

    here: State = (
        tuple(s_pos.index(c) for c in start.student_cuts),
        tuple(t_pos.index(c) for c in start.teacher_cuts) if has_t else (),
    )
    best = score(here)
    if best is None:
        return start
    seen = {here}
    spent = 1
    improved = True
    while improved and spent < budget:  # first improvement: the budget goes further
        improved = False
        for state in moves(here):
            if state in seen:
                continue
            if spent >= budget:
                break
            seen.add(state)
            spent += 1
            value = score(state)
            if value is not None and value < best:
                best, here, improved = value, state, True
                break
    return evaluate(problem, [s_pos[i] for i in here[0]], [t_pos[i] for i in here[1]])


def _increasing(idx: Sequence[int], n: int) -> bool:
    return all(0 <= i < n for i in idx) and all(a < b for a, b in itertools.pairwise(idx))
