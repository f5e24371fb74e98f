"""Student balance: partitions whose largest student stage is capped, for a schedule to choose from.

The min-max partition balances each device's whole load, student and teacher together, and
among the many partitions of about that load it may well give one device three times the
student work of another (the teacher evens it out). A synchronous student pays for that: each
batch, its micro-batches go through every stage and back before the optimizer step, and that
cycle lasts about ``(M - 1) * max_j s_j + sum_j s_j`` (``s_j``: device ``j``'s student forward
and backward of one micro-batch), however much teacher work would fill the gaps. On the 8-device
KD flagship the min-max partition's student cycle alone is 1.25x the lower bound.

:func:`capped_partitions` solves the partition problem again under caps on the student work
per device (:attr:`~tspipe_fx.partition.problem.Problem.student_cap_ms`), from the smallest cap
any partition meets up to the min-max partition's own largest student stage: the loads rise a
little as the cap falls, the student's cycle falls much more. Which one runs fastest is the
schedule's question (its simulated period): :func:`fastest` asks it. A fixed schedule is
simulated on each; a synthesized one (``auto``) ranks them by its quick estimate and takes the
best ``keep`` of them to the full synthesis.
"""

from __future__ import annotations

import dataclasses
import math

from tspipe_fx.partition.objective import schedule_costs, stage_costs
from tspipe_fx.partition.polisher import simulated_period
from tspipe_fx.partition.problem import Device, Partition, PartitionError, Problem
from tspipe_fx.partition.solver import solve
from tspipe_fx.schedule.generators import make_schedule
from tspipe_fx.schedule.simulator import simulate_costs
from tspipe_fx.schedule.task import Schedule

__all__ = [
    "CAP_STEPS", "capped_partitions", "fastest", "least_student_stage", "schedule_period", "student_stage_ms",
]  # fmt: skip

# The caps tried, as steps above the smallest possible largest student stage.
CAP_STEPS = (0.0, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.25, 0.4)


def student_stage_ms(problem: Problem, part: Partition) -> float:
    """The partition's largest student stage: forward and backward of one micro-batch, ms."""
    return max(
        c.student_fwd_ms + c.student_bwd_ms
        for c in stage_costs(problem, part.student_cuts, part.teacher_cuts)
    )


def least_student_stage(problem: Problem) -> float:
    """The smallest largest student stage any partition has (compute alone, at the devices' speeds)."""
    alone = Problem(
        student=problem.student,
        teacher=None,
        devices=tuple(Device(speed=d.speed) for d in problem.devices),
        recompute_share=problem.recompute_share,
    )
    return solve(alone).period_ms


def capped_partitions(problem: Problem, start: Partition) -> list[Partition]:
    """``start`` and the min-max partitions under each cap of :data:`CAP_STEPS` below its own
    largest student stage (distinct ones, in order of falling cap). A cap that no partition meets
    within the devices' memory is left out."""
    low, high = least_student_stage(problem), student_stage_ms(problem, start)
    out = [start]
    # A tighter cap never gives a shorter period: each search may start at the last optimum (not
    # where memory binds: the solver's first pass ignores memory, and is not bounded by that).
    unlimited = all(math.isinf(d.memory_bytes) for d in problem.devices)
    floor = start.period_ms if unlimited else 0.0
    for step in reversed(CAP_STEPS):
        cap = low * (1 + step)
        if cap >= high * (1 - 1e-9):
            continue
        try:
            part = solve(dataclasses.replace(problem, student_cap_ms=cap), at_least=floor)
        except PartitionError:  # memory: the capped stages hold more than a device has
            continue
        floor = part.period_ms if unlimited else 0.0
        if part not in out:
            out.append(part)
    return out


def schedule_period(
    problem: Problem,
    part: Partition,
    skeleton: Schedule,
    *,
    synthesize: bool = False,
    teacher_parts: int = 1,
    quick: bool = False,
) -> float:
    """The simulated period (ms per batch) of ``skeleton`` on the stages of ``part``; with
    ``synthesize``, of the ``auto`` schedule made for their costs on the skeleton's settings
    (``quick``: its fast estimate)."""
    if not synthesize:  # a fixed schedule: the polisher's own measure
        return simulated_period(problem, part.student_cuts, part.teacher_cuts, skeleton)
    costs = schedule_costs(problem, part.student_cuts, part.teacher_cuts)
    s = skeleton
    s = make_schedule("auto", s.n_stages, s.micro_batches, views=s.views, mode=s.mode, staleness=s.staleness,
                      loss=s.loss, costs=costs, teacher_parts=teacher_parts, quick=quick, n_batches=6)  # fmt: skip
    return simulate_costs(s, costs).period


def fastest(
    problem: Problem,
    start: Partition,
    skeleton: Schedule,
    *,
    synthesize: bool = False,
    teacher_parts: int = 1,
    max_load_ms: float = math.inf,
    keep: int = 1,
) -> Partition:
    """Among ``start`` (the min-max partition) and :func:`capped_partitions` whose busiest device
    is within ``max_load_ms``, the one the schedule runs fastest (see the module docstring)."""
    options = [p for p in capped_partitions(problem, start) if p.period_ms <= max_load_ms * (1 + 1e-12)] or [
        start
    ]

    def period(part: Partition, quick: bool = False) -> float:
        return schedule_period(problem, part, skeleton, synthesize=synthesize, teacher_parts=teacher_parts,
                               quick=quick)  # fmt: skip

    if synthesize and len(options) > keep:
        options = sorted(options, key=lambda p: period(p, quick=True))[:keep]
    return min(options, key=period)
