"""A discrete-event simulator: a schedule plus task costs -> a timeline.

Each device runs its list in order; a task starts when its device is free and every task it
depends on has finished (plus the link time when that task ran on another device). The result
gives the steady-state period per batch, per-device utilisation and the bubble fraction
(:mod:`tspipe_fx.report.timeline` draws it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tspipe_fx.schedule.costs import StageCosts, transfer_ms
from tspipe_fx.schedule.task import Schedule, ScheduleError, Task, dependencies, dependency_map

__all__ = ["Timeline", "simulate", "simulate_costs", "simulate_stages", "transfer_ms", "unit_costs"]

CostFn = Callable[[Task], float]


def unit_costs(task: Task) -> float:
    """TSPipe's unit model: forward 1, backward 2, optimizer step 1, loss free."""
    return {"tf": 1.0, "sf": 1.0, "sb": 2.0, "opt": 1.0, "loss": 0.0}[task.kind]


@dataclass(frozen=True)
class Timeline:
    """When every task ran: ``spans[device]`` is a list of ``(start, end, task)``."""

    schedule: Schedule
    spans: tuple[tuple[tuple[float, float, Task], ...], ...]

    @property
    def makespan(self) -> float:
        return max((s[-1][1] for s in self.spans if s), default=0.0)

    def batch_end(self, b: int) -> float:
        """When the last optimizer step of batch ``b`` finished."""
        return max(end for spans in self.spans for _, end, t in spans if t.kind == "opt" and t.batch == b)

    @property
    def period(self) -> float:
        """Steady-state time per batch: the mean gap between consecutive batches' last steps,
        leaving out the first batch (pipeline fill) and the last (drain: no next teacher)."""
        n = self.schedule.n_batches
        if n <= 2:
            return self.batch_end(n - 1) / n
        first = 2 if n >= 4 else 1
        return (self.batch_end(n - 2) - self.batch_end(first - 1)) / (n - 1 - first)

    def utilisation(self) -> list[float]:
        """Busy fraction of each device between the start and the end of the whole run."""
        total = self.makespan
        return [sum(e - s for s, e, _ in spans) / total if total else 0.0 for spans in self.spans]

    def steady_utilisation(self) -> list[float]:
        """Busy fraction of each device within the steady-state window (batches 1..n-2)."""
        n = self.schedule.n_batches
        lo, hi = (self.batch_end(0), self.batch_end(n - 2)) if n >= 3 else (0.0, self.makespan)
        out = []
        for spans in self.spans:
            busy = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e, _ in spans)
            out.append(busy / (hi - lo) if hi > lo else 0.0)
        return out

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the devices in steady state."""
        u = self.steady_utilisation()
        return 1.0 - sum(u) / len(u)


def simulate(
    s: Schedule, cost: CostFn = unit_costs, *, link: Callable[[Task, Task], float] | None = None
) -> Timeline:
    """Run the schedule's lists against ``cost(task)``; ``link(dep, task)`` is the transfer time
    when ``dep`` ran on another device (default 0)."""
    known = dependency_map(s)
    table = {}
    for _, t in s.tasks():
        deps = known[t] if t in known else dependencies(s, t)
        table[t] = (cost(t), tuple((dep, link(dep, t) if link else 0.0) for dep in deps))
    return _run(s, table)


def simulate_costs(schedule: Schedule, costs: StageCosts) -> Timeline:
    """The schedule with every task priced by ``costs`` (a split backward as its two halves)."""
    priced = costs.for_schedule(schedule.split_backward, schedule.teacher_parts)
    table = _priced(dataclasses.replace(schedule, name="", devices=(), variant=""), priced)
    if any(t not in table for _, t in schedule.tasks()):  # (not a complete schedule: priced as it is)
        return simulate(schedule, priced.task_ms, link=priced.link_ms)
    return _run(schedule, table)


Table = dict[Task, tuple[float, tuple[tuple[Task, float], ...]]]  # task -> (cost, (dependency, link))


@functools.lru_cache(maxsize=16)
def _priced(skeleton: Schedule, costs: StageCosts) -> Table:
    """Every task of the kind of schedule priced once: the synthesizer simulates hundreds of
    candidate lists over the same tasks and costs. Read-only."""
    return {
        t: (costs.task_ms(t), tuple((dep, costs.link_ms(dep, t)) for dep in deps))
        for t, deps in dependency_map(skeleton).items()
    }


def _run(s: Schedule, table: Table) -> Timeline:
    device_of = {t: d for d, t in s.tasks()}
    finish: dict[Task, float] = {}
    free = [0.0] * len(s.devices)
    heads = [0] * len(s.devices)
    spans: list[list[tuple[float, float, Task]]] = [[] for _ in s.devices]
    remaining = sum(len(d) for d in s.devices)
    while remaining:
        progressed = False
        for d, tasks in enumerate(s.devices):
            at = free[d]
            while heads[d] < len(tasks):
                t = tasks[heads[d]]
                took, deps = table[t]
                ready = at
                for dep, lk in deps:
                    end = finish.get(dep)
                    if end is None:
                        break
                    if device_of[dep] != d:
                        end += lk
                    if end > ready:
                        ready = end
                else:
                    at = ready + took
                    finish[t] = at
                    spans[d].append((ready, at, t))
                    heads[d] += 1
                    remaining -= 1
                    progressed = True
                    continue
                break
            free[d] = at
        if not progressed:
            raise ScheduleError(f"{s.name}: deadlock in simulation; run schedule.validator() for details")
    return Timeline(s, tuple(tuple(x) for x in spans))


def simulate_stages(
    schedule: Schedule,
    *,
    student_fwd_ms: Sequence[float],
    student_bwd_ms: Sequence[float],
    teacher_fwd_ms: Sequence[float],
    student_send_ms: Sequence[float] | None = None,
    teacher_send_ms: Sequence[float] | None = None,
) -> Timeline:
    """Per-stage costs through ``schedule``: stage ``j``'s student forward, backward and teacher
    forward of one micro-batch on device ``j``, and the time to send that stage's activations
    to the next device (a gradient travels back as large as the activation it belongs to; none
    given: free). Optimizer steps and the loss take no time."""
    costs = StageCosts.of(student_fwd_ms, student_bwd_ms, teacher_fwd_ms,
                          student_send_ms or (), teacher_send_ms or ())  # fmt: skip
    return simulate_costs(schedule, costs)
