"""The partition objective: the load and memory of any stage, and the score of any cuts.

The same :class:`Objective` serves the solvers, :func:`evaluate` (the solver's answer, the brute
force in the tests, manual balances, the baselines in reports) and :func:`stage_costs` (what the
schedule simulator is given).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

from tspipe_fx.partition.problem import Chain, Device, Partition, PartitionError, Problem, StageCost
from tspipe_fx.schedule.costs import StageCosts, transfer_ms

__all__ = ["Objective", "evaluate", "fits", "link_ms", "schedule_costs", "stage_costs"]


class _Prefix:
    """Prefix sums of one chain at the boundaries ``0, cut positions..., n``."""

    def __init__(self, chain: Chain, *, with_bwd: bool, params_factor: float, in_flight: int):
        self.pos = [0] + [p for p, _ in chain.cuts] + [chain.n]
        self.bytes = [0] + [b for _, b in chain.cuts] + [0]
        work = np.cumsum(
            [0.0] + [f + (b if with_bwd else 0.0) for f, b in zip(chain.fwd_ms, chain.bwd_ms, strict=False)]
        )
        fwd = np.cumsum([0.0, *chain.fwd_ms])
        mem = np.cumsum(
            [0.0]
            + [
                p * params_factor + a * in_flight
                for p, a in zip(chain.param_bytes, chain.act_bytes, strict=False)
            ]
        )
        self.work = work[self.pos]
        self.fwd = fwd[self.pos]
        self.mem = mem[self.pos]
        self.index = {p: i for i, p in enumerate(self.pos)}


def link_ms(dev: Device, nbytes: float) -> float:
    """Time to send ``nbytes`` over the link after ``dev`` (the simulator's own rule)."""
    return transfer_ms(nbytes, dev.link_gbs, dev.link_latency_ms)


class Objective:
    """The load and memory of any stage, shared by the solvers and :func:`evaluate`."""

    def __init__(self, problem: Problem):
        if problem.micro_batches < 1:
            raise PartitionError(f"micro_batches must be >= 1, got {problem.micro_batches}")
        if not problem.devices:
            raise PartitionError("no devices to partition onto")
        self.p = problem
        self.m = problem.micro_batches
        in_flight = problem.in_flight if problem.in_flight is not None else problem.micro_batches
        self.s = _Prefix(
            problem.student, with_bwd=True, params_factor=2 + problem.optimizer_factor, in_flight=in_flight
        )
        t = problem.teacher or Chain((), (), (), (), ())
        self.t = _Prefix(t, with_bwd=not problem.teacher_fwd_only, params_factor=1.0, in_flight=0)
        self.has_teacher = problem.teacher is not None and problem.teacher.n > 0

    def student_work(self, j: int) -> np.ndarray:
        """Prefix sums of the student's work on device ``j``: forward, backward and the forwards
        its recompute runs again."""
        share = self.p.replay_share(j)
        return self.s.work + share * self.s.fwd if share else self.s.work

    def student_window(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Under the problem's student cap, per boundary index: the first index a stage of device
        ``j`` ending there may start at, and one past the last it may end at when it starts there."""
        ms = self.student_work(j) / self.p.devices[j].speed
        cap = self.p.student_cap_ms * (1 + 1e-12) + 1e-9
        idx = np.arange(len(ms))
        if math.isinf(cap):
            return np.zeros_like(idx), np.full_like(idx, len(ms))
        return np.searchsorted(ms, ms - cap, side="left"), np.searchsorted(ms, ms + cap, side="right")

    def within_cap(self, j: int, u: int, u2: int) -> bool:
        """Whether device ``j``'s student boundary indices ``[u, u2)`` keep under the student cap."""
        ms = self.student_work(j) / self.p.devices[j].speed
        return bool(ms[u2] - ms[u] <= self.p.student_cap_ms * (1 + 1e-12) + 1e-9)

    def x(self, link: int, nbytes: float, at_end: bool) -> float:
        """Transfer time over the link after device ``link``; no transfer at a chain's ends."""
        if at_end or link < 0 or link >= len(self.p.devices) - 1:
            return 0.0
        return link_ms(self.p.devices[link], nbytes)

    def stage(self, j: int, u: int, u2: int, v: int, v2: int) -> tuple[float, float]:
        """(load ms, memory bytes) of device ``j`` holding boundary indices ``[u, u2)``, ``[v, v2)``."""
        dev = self.p.devices[j]
        s, t = self.s, self.t
        last_s, last_t = len(s.pos) - 1, len(t.pos) - 1
        sw = self.student_work(j)
        work = (sw[u2] - sw[u]) + (t.work[v2] - t.work[v] if self.has_teacher else 0.0)
        comm = 2 * (self.x(j - 1, s.bytes[u], u == 0) + self.x(j, s.bytes[u2], u2 == last_s))
        if self.has_teacher:
            comm += self.x(j - 1, t.bytes[v], v == 0) + self.x(j, t.bytes[v2], v2 == last_t)
        mem = (s.mem[u2] - s.mem[u]) + (t.mem[v2] - t.mem[v] if self.has_teacher else 0.0)
        return self.m * (work / dev.speed + comm), mem


def evaluate(problem: Problem, student_cuts: Sequence[int], teacher_cuts: Sequence[int] = ()) -> Partition:
    """Score given cut positions (``n_devices - 1`` per chain) under the problem's model."""
    model = Objective(problem)
    n = len(problem.devices)
    bounds = []
    for name, prefix, cuts, needed in (
        ("student", model.s, student_cuts, True),
        ("teacher", model.t, teacher_cuts, model.has_teacher),
    ):
        if not needed:
            bounds.append([0] * (n + 1))
            continue
        if len(cuts) != n - 1:
            raise PartitionError(f"{name}: {n} devices need {n - 1} cuts, got {len(cuts)}: {list(cuts)}")
        unknown = [c for c in cuts if c not in prefix.index]
        if unknown:
            raise PartitionError(f"{name}: cuts {unknown} are not candidate cut positions")
        idx = [0] + [prefix.index[c] for c in cuts] + [len(prefix.pos) - 1]
        if any(b <= a for a, b in itertools.pairwise(idx)):
            raise PartitionError(
                f"{name}: cuts must increase strictly (every stage non-empty), got {list(cuts)}"
            )
        bounds.append(idx)
    loads, mems = [], []
    for j in range(n):
        load, mem = model.stage(j, bounds[0][j], bounds[0][j + 1], bounds[1][j], bounds[1][j + 1])
        loads.append(load)
        mems.append(mem)
    return Partition(tuple(student_cuts), tuple(teacher_cuts), tuple(loads), tuple(mems))


def stage_costs(
    problem: Problem, student_cuts: Sequence[int], teacher_cuts: Sequence[int] = ()
) -> list[StageCost]:
    """Per device, what the stages at these cuts cost (speeds and links applied)."""
    evaluate(problem, student_cuts, teacher_cuts)  # the same checks of the cuts
    n = len(problem.devices)
    teacher = problem.teacher or Chain((), (), (), (), ())
    s_sums = problem.student.stage_sums(student_cuts)
    t_sums = teacher.stage_sums(teacher_cuts) if teacher.n else [None] * n
    s_out = [dict(problem.student.cuts)[c] for c in student_cuts]
    t_out = [dict(teacher.cuts)[c] for c in teacher_cuts] if teacher.n else []
    out = []
    for j, (dev, s, t) in enumerate(zip(problem.devices, s_sums, t_sums, strict=True)):
        last = j == n - 1
        out.append(
            StageCost(
                s.fwd_ms / dev.speed,
                (s.bwd_ms + problem.replay_share(j) * s.fwd_ms) / dev.speed,  # a recompute replays
                (t.fwd_ms if t is not None else 0.0) / dev.speed,
                0.0 if last else link_ms(dev, s_out[j]),
                0.0 if last or not teacher.n else link_ms(dev, t_out[j]),
            )
        )
    return out


def schedule_costs(
    problem: Problem, student_cuts: Sequence[int], teacher_cuts: Sequence[int] = ()
) -> StageCosts:
    """:func:`stage_costs` as the schedule simulator and synthesizer take them."""
    per = stage_costs(problem, student_cuts, teacher_cuts)
    costs = StageCosts.of(
        [c.student_fwd_ms for c in per],
        [c.student_bwd_ms for c in per],
        [c.teacher_fwd_ms for c in per],
        [c.student_send_ms for c in per],
        [c.teacher_send_ms for c in per],
    )
    if len(problem.split_shares) != len(per):  # (timed for other stages, or not at all)
        return costs
    return dataclasses.replace(costs, split_shares=problem.split_shares)


def fits(problem: Problem, part: Partition) -> bool:
    """Whether every device holds its share of the partition within its memory."""
    return all(
        m <= d.memory_bytes * (1 + 1e-12) for m, d in zip(part.memory_bytes, problem.devices, strict=False)
    )
