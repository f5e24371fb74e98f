"""compile's memory step: each device's predicted peak, and a partition that keeps within it.

The solver bounds memory with its additive model (parameters, optimizer state, activations of
every micro-batch). The prediction (:func:`tspipe_fx.partition.memory.predict_memory`) knows
more: the schedule's micro-batches in flight, the cut buffers, the largest task's working set,
recompute. Where the prediction exceeds a device's limit, the step either

* tightens the solver's limit for every device by what its model leaves out on this partition,
  and solves again, or
* (``recompute="auto"``) steps up the recompute of each device over its limit: ``never`` ->
  ``except_last`` -> ``always``; the replayed forwards count in its load (the objective) and in
  the simulated schedule,

until every device fits, or says which device does not and by how much. ``auto`` takes both
ways and keeps the shorter simulated period.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tspipe_fx.compiler.partitioner import Partitioner, cuts_of
from tspipe_fx.partition.memory import predict_memory
from tspipe_fx.partition.objective import schedule_costs
from tspipe_fx.partition.problem import Partition, PartitionError, Problem
from tspipe_fx.partition.solver import fmt_bytes, least_memory
from tspipe_fx.schedule.memory import StageMemory, replay_share
from tspipe_fx.schedule.simulator import simulate_costs
from tspipe_fx.schedule.task import Schedule

__all__ = ["Fitted", "fit_memory", "predicted"]

ROUNDS = 6
STEP_UP = {"never": "except_last", "except_last": "always", "always": "always"}  # recompute="auto"
ScheduleOf = Callable[[Problem, Partition], Schedule]  # the schedule a partition trains under


@dataclass(frozen=True)
class Fitted:
    """A partition within the devices' memory, with what it was solved under."""

    partitioner: Partitioner  # with the recompute shares (and tightened limits) it was solved under
    part: Partition
    memory: tuple[StageMemory, ...]  # (empty where the devices' memory is unlimited: nothing was fitted)
    recompute: tuple[str, ...]


def predicted(
    partitioner: Partitioner, costs: tuple[Sequence[Any], Sequence[Any]], part: Partition,
    schedule_of: ScheduleOf, recompute: Sequence[str], weight_copies: float,
) -> tuple[StageMemory, ...]:  # fmt: skip
    """Each device's predicted peak of ``part`` under the schedule it trains with."""
    problem = partitioner.problem(*costs, cuts_of(part))
    return predict_memory(
        problem, part, schedule_of(problem, part), recompute=recompute, weight_copies=weight_copies
    )


def _with_recompute(partitioner: Partitioner, policies: Sequence[str]) -> Partitioner:
    m = partitioner.micro_batches
    share = tuple(replay_share(p, m) for p in policies)
    return dataclasses.replace(partitioner, recompute_share=share if any(share) else ())


def fit_memory(
    partitioner: Partitioner,
    costs: tuple[Sequence[Any], Sequence[Any]],
    schedule_of: ScheduleOf,
    *,
    recompute: str | Sequence[str],
    weight_copies: float,
) -> Fitted:
    """The best partition whose predicted peaks fit the devices' memory (see the module).
    ``recompute="auto"`` tries both ways (cuts moved only, and recompute where a device is over)
    and keeps the shorter simulated period (on a tie, the one that recomputes less).

    Raises:
        PartitionError: no partition found within memory; the message names the devices over
            their limits, by how much, and what would help.
    """
    if all(math.isinf(d.memory_bytes) for d in partitioner.devices):  # nothing to fit: no prediction here
        n = len(partitioner.devices)
        policies = (
            ["never" if recompute == "auto" else recompute] * n if isinstance(recompute, str) else recompute
        )
        solver = _with_recompute(partitioner, policies)
        return Fitted(solver, solver.best(*costs), (), tuple(policies))
    if recompute != "auto":
        return _fit(partitioner, costs, schedule_of, recompute, False, weight_copies)
    routes, error = [], None
    for escalate in (False, True):
        try:
            routes.append(_fit(partitioner, costs, schedule_of, "never", escalate, weight_copies))
        except PartitionError as e:
            error = e
    if not routes:
        assert error is not None
        raise error

    def period(f: Fitted) -> float:
        problem = f.partitioner.problem(*costs, cuts_of(f.part))
        return simulate_costs(schedule_of(problem, f.part), schedule_costs(problem, *cuts_of(f.part))).period

    return min(routes, key=lambda f: (period(f) * (1 - 1e-9), sum(r != "never" for r in f.recompute)))


def _fit(
    partitioner: Partitioner,
    costs: tuple[Sequence[Any], Sequence[Any]],
    schedule_of: ScheduleOf,
    recompute: str | Sequence[str],
    escalate: bool,
    weight_copies: float,
) -> Fitted:
    n = len(partitioner.devices)
    limits = [d.memory_bytes for d in partitioner.devices]
    policies = [recompute] * n if isinstance(recompute, str) else list(recompute)
    # The prediction is the authority: the solver starts without limits and gets its own (additive
    # model's) limits from what the prediction says of the partitions it proposes.
    unlimited = tuple(dataclasses.replace(d, memory_bytes=math.inf) for d in partitioner.devices)
    devices = unlimited
    closest: tuple[float, tuple[StageMemory, ...], list[str]] | None = None  # for the error
    for _ in range(ROUNDS):
        solver = dataclasses.replace(_with_recompute(partitioner, policies), devices=devices)
        try:
            part = solver.best(*costs)
        except PartitionError:
            if devices is unlimited:  # not memory: the graphs cannot be cut so (too few cuts)
                raise
            break
        memory = predicted(solver, costs, part, schedule_of, policies, weight_copies)
        over = [j for j in range(n) if memory[j].total > limits[j] * (1 + 1e-9)]
        if not over:
            return Fitted(solver, part, memory, tuple(policies))
        excess = max(m.total / lim for m, lim in zip(memory, limits, strict=True))
        if closest is None or excess < closest[0]:
            closest = (excess, memory, list(policies))
        if escalate and any(policies[j] != "always" for j in over):
            for j in over:
                policies[j] = STEP_UP[policies[j]]
            devices = unlimited
            continue
        if partitioner.fixed is not None:
            break
        # each device's limit less what the solver's model leaves out on this partition (never
        # looser than the last round's: the solver must move on)
        tight = [
            min(d.memory_bytes, lim - (m.total - a))
            for d, lim, m, a in zip(devices, limits, memory, part.memory_bytes, strict=True)
        ]
        if min(tight) <= 0:
            break
        devices = tuple(dataclasses.replace(d, memory_bytes=t) for d, t in zip(devices, tight, strict=True))
    assert closest is not None
    _, memory, policies = closest
    worst = policies if not escalate else ["always"] * n
    least = _least(partitioner, costs, schedule_of, worst, weight_copies)
    raise PartitionError(
        "no partition found within the devices' memory; the closest: "
        + "; ".join(
            f"device {j} would need {fmt_bytes(m.total)} of its {fmt_bytes(lim)} (predicted peak, "
            f"recompute {policies[j]!r})"
            for j, (m, lim) in enumerate(zip(memory, limits, strict=True))
            if m.total > lim * (1 + 1e-9)
        )
        + f"; the leanest partition found needs {fmt_bytes(least)} per device; hint: "
        + ("" if escalate or recompute == "always" else "recompute='auto', ")
        + "more micro-batches (smaller ones hold less), more devices, precision='bf16', or a memory_limit of "
        "at least that"
    )


def _least(
    partitioner: Partitioner, costs: tuple[Sequence[Any], Sequence[Any]], schedule_of: ScheduleOf,
    policies: Sequence[str], weight_copies: float,
) -> float:  # fmt: skip
    """The predicted peak of the partition whose largest memory (the solver's model) is smallest."""
    solver = _with_recompute(partitioner, policies)
    if solver.fixed is not None:
        part = solver.at(*costs, solver.fixed)
    else:
        part = least_memory(solver.problem(*costs))
    return max(m.total for m in predicted(solver, costs, part, schedule_of, policies, weight_copies))
