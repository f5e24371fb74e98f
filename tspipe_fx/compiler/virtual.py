"""compile's virtual-stage step: two stages per device, where the simulator shows they pay.

A momentum pair cut into ``N`` contiguous pieces is only as balanced as its coarsest nodes
allow (BYOL ResNet-18 on 8 devices: the busiest device 1.17x the bound). Cut into ``2N`` stages,
device ``d`` holding stages ``d`` and ``d + N`` (:mod:`tspipe_fx.partition.interleave`), a long
first stage is evened out by a short second one. Whether that pays is the synthesized
schedule's question: the interleaved partitions (a few caps on a stage's share) are simulated
under ``auto`` with two stages per device, against the one-stage plan's own period.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tspipe_fx.compiler.partitioner import Partitioner
from tspipe_fx.errors import TspipeError
from tspipe_fx.partition.interleave import interleaved, stage_problem
from tspipe_fx.partition.objective import schedule_costs
from tspipe_fx.partition.problem import Partition, PartitionError, Problem
from tspipe_fx.schedule.simulator import simulate_costs
from tspipe_fx.schedule.task import Schedule

__all__ = ["STAGE_SLACKS", "Interleaved", "check_stages_per_device", "interleave"]

STAGE_SLACKS = (0.4, 0.5, 0.6, 1.0)  # caps on a stage's share tried (partition.interleave.interleaved)
GAIN = 0.01  # two stages per device are taken when they simulate at least this much faster

Synthesized = Callable[[Problem, Partition, int], Schedule]  # (problem, cuts, stages per device) -> auto


@dataclass(frozen=True)
class Interleaved:
    """Two stages per device: the partitioner with a device per stage, and the cuts."""

    partitioner: Partitioner
    part: Partition


def check_stages_per_device(value: object, **settings: Any) -> int:
    """``stages_per_device`` is 1, 2 or ``"auto"``; above 1 (or with a saved plan of virtual
    stages) it needs what the interleaved partition models (``settings``: mode, schedule, plan,
    balance, refine, recompute). Returns the saved plan's stages per device (1 without one)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value not in (1, 2, "auto"):
        raise TspipeError(
            f"stages_per_device must be 1, 2 or 'auto' (two where the simulator shows they pay), got {value!r}"
        )
    saved = settings["plan"]
    if saved is not None and value != 1:
        raise TspipeError(
            f"stages_per_device={value!r} with a saved plan: the plan fixes its stages ({saved.stages_per_device} "
            "per device); hint: leave stages_per_device out, or compile without the plan"
        )
    per_device = 1 if saved is None else saved.stages_per_device
    if value == 1 and per_device == 1:
        return per_device
    needs = {"mode": "momentum", "schedule": "auto", "balance": None, "refine": 0, "recompute": "never"}
    wrong = {k: settings[k] for k, v in needs.items() if settings[k] != v}
    if wrong:
        got = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        what = f"stages_per_device={value!r}"
        if saved is not None:
            what = f"a saved plan of {per_device} stages per device"
        raise TspipeError(
            f"{what} (virtual stages) needs mode='momentum', schedule='auto', no balance, refine=0 and "
            f"recompute='never'; got {got}; hint: stages_per_device=1"
        )
    return per_device


def interleave(
    partitioner: Partitioner,
    costs: tuple[Sequence[Any], Sequence[Any]],
    part: Partition,
    synthesized: Synthesized,
    *,
    force: bool,
) -> Interleaved | None:
    """The fastest interleaved partition when it beats ``part`` (one stage per device) by
    :data:`GAIN` in simulated period, or whenever one exists with ``force``; else None.

    Raises:
        PartitionError: with ``force``, when no interleaved partition exists (too few candidate
            cuts, devices of several speeds, memory).
    """
    problem = partitioner.problem(*costs)
    best: tuple[float, Partition] | None = None
    failure: PartitionError | None = None
    staged = stage_problem(problem, 2)
    for slack in STAGE_SLACKS:
        try:
            cand = interleaved(problem, stage_slack=slack)
        except PartitionError as e:
            failure = e
            continue
        period = _period(staged, cand, synthesized, 2)
        if best is None or period < best[0]:
            best = (period, cand)
    if best is None:
        if force and failure is not None:
            raise failure
        return None
    if not force and best[0] > _period(problem, part, synthesized, 1) * (1 - GAIN):
        return None
    return Interleaved(dataclasses.replace(partitioner, devices=staged.devices, recompute_share=()), best[1])


def _period(problem: Problem, part: Partition, synthesized: Synthesized, per_device: int) -> float:
    costs = schedule_costs(problem, part.student_cuts, part.teacher_cuts)
    return simulate_costs(synthesized(problem, part, per_device), costs).period
