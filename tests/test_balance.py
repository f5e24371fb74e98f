"""Student balance: min-max partitions under a cap on each device's student work, as pure data."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from test_partition import problems

from tspipe_fx.partition import Chain, Device, Problem, solve
from tspipe_fx.partition.balance import capped_partitions, least_student_stage, student_stage_ms
from tspipe_fx.partition.objective import schedule_costs
from tspipe_fx.schedule.generators import make_schedule
from tspipe_fx.schedule.simulator import simulate_costs


@settings(max_examples=150, deadline=None)
@given(problems())
def test_least_student_stage_is_the_brute_force_minimum(problem: Problem) -> None:
    n = len(problem.devices)
    positions = [p for p, _ in problem.student.cuts]
    best = math.inf
    for cuts in itertools.combinations(positions, n - 1):
        sums = problem.student.stage_sums(cuts)
        best = min(best, max((s.fwd_ms + s.bwd_ms) / d.speed for s, d in zip(sums, problem.devices, strict=True)))
    assert least_student_stage(problem) == pytest.approx(best, rel=1e-9, abs=1e-9)


def _example(big: float = 12.0, small: float = 2.0) -> Problem:
    """Sixteen equal student nodes; a teacher heavy at both ends, which the min-max partition
    evens out by giving the end devices little student work (and the middle ones much)."""
    student = Chain((1.0,) * 16, (2.0,) * 16, (0,) * 16, (0,) * 16, tuple((p, 0) for p in range(1, 16)))
    teacher = Chain.uniform([big, small, small, small, small, big])
    return Problem(student, teacher, tuple(Device() for _ in range(4)), micro_batches=4)


def test_capped_partitions_trade_load_for_student_balance() -> None:
    problem = _example()
    start = solve(problem)
    parts = capped_partitions(problem, start)
    assert parts[0] == start and len(parts) == len(set(parts)) >= 2
    stages = [student_stage_ms(problem, p) for p in parts]
    assert stages == sorted(stages, reverse=True) and stages[0] > stages[-1]  # the caps fall...
    assert stages[-1] == pytest.approx(least_student_stage(problem))  # ... to the smallest possible
    assert all(p.period_ms >= start.period_ms for p in parts)  # the loads rise (start is min-max)


def test_a_balanced_student_runs_faster_though_its_load_is_higher() -> None:
    """The min-max partition (load 80) puts 6 of 16 student nodes on each middle device; its
    synthesized schedule takes 90 per batch. Capping the student at 5 nodes per device raises the
    load to 84 and the schedule runs at 88."""
    problem = _example()
    n, m = len(problem.devices), problem.micro_batches

    def period(part: object) -> float:
        c = schedule_costs(problem, part.student_cuts, part.teacher_cuts)  # type: ignore[attr-defined]
        return simulate_costs(make_schedule("auto", n, m, loss="micro", costs=c, n_batches=6), c).period

    start, *capped = capped_partitions(problem, solve(problem))
    assert (start.period_ms, period(start)) == (80.0, 90.0)
    best = min(capped, key=period)
    assert (best.student_cuts, best.period_ms, period(best)) == ((3, 8, 13), 84.0, 88.0)


def test_a_cap_that_does_not_fit_in_memory_is_left_out() -> None:
    """Each student node holds 20 bytes of weights and gradients; the middle devices have room
    for 3 nodes, the end ones for 7. The smallest largest student stage (4 nodes, 12 ms) needs 4
    on every device: that cap is skipped, not an error, and every partition offered fits."""
    base = _example()
    student = Chain(base.student.fwd_ms, base.student.bwd_ms, (10,) * 16, (0,) * 16, base.student.cuts)
    devices = tuple(Device(memory_bytes=b) for b in (140.0, 60.0, 60.0, 140.0))
    problem = Problem(student, base.teacher, devices, micro_batches=4, optimizer_factor=0.0)
    assert least_student_stage(problem) == 12.0
    start = solve(problem)  # 5, 3, 3, 5 nodes: 15 ms on the end devices
    assert student_stage_ms(problem, start) == 15.0
    assert capped_partitions(problem, start) == [start]  # every lower cap needs 4 on a middle device
