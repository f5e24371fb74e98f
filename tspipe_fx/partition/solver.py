"""Exact min-max partition of a student chain and a teacher chain into pipeline stages.

No torch here: the compiler hands over plain per-node numbers (see :class:`Chain`), this module
hands back cut positions. The problem (docs/design.md, "The partition problem"): device ``j`` holds one contiguous
student segment and one contiguous teacher segment, and its load per batch is::

    load(j) = M * ( (S_fwd + S_bwd + T_fwd) / speed_j          # compute
                    + 2 * (x(in_s) + x(out_s))                  # student activations + gradients
                    + x(in_t) + x(out_t) )                      # teacher activations
    x(cut)  = cut bytes / link bandwidth + link latency         (0 at either end of a chain)

The period is ``max_j load(j)``; we minimise it subject to each device's memory::

    params_s * (2 + optimizer_factor) + in_flight * activations_s + params_t  <=  memory_j

How (KD, two independent chains): bisection on the period ``P``. For a given ``P``, stage by
stage, the set of reachable cut pairs ``(u, v)`` is a boolean grid. Each stage cost splits as
``A(u2) + B(v2) - a(u) - b(v)`` (the receiving end's cost depends only on the incoming cut, the
sending end's only on the outgoing one), so ``(u2, v2)`` is reachable iff the largest
``a(u) + b(v)`` over reachable ``u < u2, v < v2`` is at least ``A(u2) + B(v2) - P/M``: a 2D prefix
maximum, O(Cs * Ct) per stage. Where the memory limit binds, the exact check per source row
``u`` turns the memory bound into a lower bound ``v >= vmin(u2, v2)`` (memory prefix sums are
monotone) and takes a range maximum over ``v`` with a sparse table: O(Cs^2 * Ct log Ct).

Momentum (``mirror``): the teacher's cuts are paired with the student's, so the state is one
index and a direct DP ``f_j(c2) = min_c max(f_{j-1}(c), load_j(c, c2))`` is exact, O(n C^2).

"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tspipe_fx.partition.memory_grid import reach_with_memory, window_max
from tspipe_fx.partition.objective import Objective, evaluate, fits
from tspipe_fx.partition.problem import Chain, Device, Partition, PartitionError, Problem

__all__ = ["fmt_bytes", "least_memory", "solve"]


def solve(problem: Problem, *, at_least: float = 0.0) -> Partition:
    """The partition with the smallest period that fits every device's memory.

    ``at_least``: a period known to be no larger than the answer (the optimum of a less
    constrained problem: the search starts just above it).

    Raises:
        PartitionError: too few candidate cuts for the devices, or no partition fits in memory
            (the message states the smallest memory per device that would work).
    """
    model = Objective(problem)
    n = len(problem.devices)
    for name, prefix, needed in (("student", model.s, True), ("teacher", model.t, model.has_teacher)):
        if needed and len(prefix.pos) - 1 < n:
            raise PartitionError(
                f"the {name} graph has {len(prefix.pos) - 2} candidate cuts: too few for {n} stages; "
                "hint: use fewer devices, or allow more cut positions"
            )
    if problem.mirror and (not model.has_teacher or len(model.s.pos) != len(model.t.pos)):
        raise PartitionError("mirror needs a teacher chain with as many candidate cuts as the student's")
    best = _attempt(model, at_least)
    if best is None and math.isfinite(problem.student_cap_ms):
        if _attempt(Objective(dataclasses.replace(problem, student_cap_ms=math.inf))) is not None:
            raise PartitionError(
                f"no partition keeps every device's student work under student_cap_ms={problem.student_cap_ms:g} "
                "ms per micro-batch; hint: a larger cap, or more devices"
            )
    if best is None:
        need = _min_uniform_memory(problem)
        raise PartitionError(
            f"no partition fits the devices' memory ({fmt_bytes(min(d.memory_bytes for d in problem.devices))} "
            f"on the smallest); the smallest memory per device that would work is {fmt_bytes(need)}; hint: "
            "more devices, fewer micro-batches in flight, or a memory_limit of at least that"
        )
    return best


def _attempt(model: Objective, at_least: float = 0.0) -> Partition | None:
    """The best partition, or None where none fits (memory, or the student cap)."""
    if model.p.mirror:
        return _solve_mirror(model)
    best = _solve_pair(model, memory=False, lower=at_least)
    if best is not None and not fits(model.p, best):
        # The unconstrained optimum bounds the constrained one from below.
        best = _solve_pair(model, memory=True, lower=best.period_ms)
    return best


def fmt_bytes(b: float) -> str:
    """``b`` bytes for people: ``1.50 MiB (1,572,864 bytes)``."""
    if math.isinf(b):
        return "unlimited"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit} ({math.ceil(b):,} bytes)"
    return f"{math.ceil(b):,} bytes"


def _min_uniform_memory(problem: Problem) -> float:
    """The smallest equal per-device memory for which a partition exists (min-max memory)."""
    return max(least_memory(problem).memory_bytes)


def least_memory(problem: Problem) -> Partition:
    """The partition whose largest device memory (this module's model) is the smallest."""

    # Swap roles: minimise the largest memory, i.e. a min-max partition on memory instead of time.
    # The memory objective is the time objective with work := memory, no comm, no speeds.
    def as_work(c: Chain | None, factor: float, in_flight: int) -> Chain | None:
        if c is None:
            return None
        mem = tuple(p * factor + a * in_flight for p, a in zip(c.param_bytes, c.act_bytes, strict=False))
        return Chain(mem, (0.0,) * c.n, (0,) * c.n, (0,) * c.n, tuple((p, 0) for p, _ in c.cuts))

    in_flight = problem.in_flight if problem.in_flight is not None else problem.micro_batches
    swapped = Problem(
        student=as_work(problem.student, 2 + problem.optimizer_factor, in_flight),  # type: ignore[arg-type]
        teacher=as_work(problem.teacher, 1.0, 0),
        devices=tuple(Device() for _ in problem.devices),
        micro_batches=1,
        mirror=problem.mirror,
    )
    lean = solve(swapped)
    return evaluate(problem, lean.student_cuts, lean.teacher_cuts)


def _solve_pair(model: Objective, *, memory: bool, lower: float = 0.0) -> Partition | None:
    """Bisection on the period with reachable-grid feasibility (see the module docstring).

    Bisect until the bracket is within 1e-4 of the period, then snap: take the partition found
    at the upper end, and ask whether anything is strictly better than its real period. The
    periods of partitions are discrete, so this ends on the exact optimum in a step or two
    instead of the ~20 halvings a 1e-9 bracket would take.
    """
    problem = model.p
    lo = lower * (1 - 1e-9)
    hi, grids = _bracket(model, memory, lower)
    if grids is None:
        return None
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        found = _reach(model, mid, memory)
        if found is None:
            lo = mid
        else:
            hi, grids = mid, found
    while True:
        su, tv = _backtrack(model, hi, grids, memory)
        best = evaluate(
            problem, [model.s.pos[u] for u in su], [model.t.pos[v] for v in tv] if model.has_teacher else []
        )
        better = best.period_ms - 4 * _tol(best.period_ms)
        found = _reach(model, better, memory) if better > lo else None
        if found is None:
            return best
        hi, grids = better, found


def _bracket(model: Objective, memory: bool, lower: float) -> tuple[float, list[np.ndarray] | None]:
    """A feasible period and its grids: just above a known lower bound if possible, else the upper bound."""
    if lower > 0:  # the constrained optimum is usually close to the unconstrained one
        for step in (1e-3, 1e-2, 1e-1, 1.0):
            grids = _reach(model, lower * (1 + step), memory)
            if grids is not None:
                return lower * (1 + step), grids
    hi = _upper_bound(model)
    return hi, _reach(model, hi, memory)


def _upper_bound(model: Objective) -> float:
    """A period no partition exceeds: all the work on the slowest device, every transfer at its worst."""
    dev = model.p.devices
    slowest = min(d.speed for d in dev)
    work = model.s.work[-1] + model.s.fwd[-1] + (model.t.work[-1] if model.has_teacher else 0.0)
    worst = max(
        (model.x(j, b, False) for j in range(len(dev) - 1) for b in [*model.s.bytes, *model.t.bytes]),
        default=0.0,
    )
    return model.m * (work / slowest + 6 * worst) * (1 + 1e-6) + 1e-9


def _stage_terms(model: Objective, j: int) -> tuple[np.ndarray, ...]:
    """Per-boundary terms of stage ``j``: cost = M*(A[u2] + B[v2] - a[u] - b[v])."""
    dev = model.p.devices[j]
    s, t = model.s, model.t
    ls, lt = len(s.pos) - 1, len(t.pos) - 1
    x_in_s = np.array([model.x(j - 1, s.bytes[u], u == 0) for u in range(ls + 1)])
    x_out_s = np.array([model.x(j, s.bytes[u], u == ls) for u in range(ls + 1)])
    work = model.student_work(j)
    a = work / dev.speed - 2 * x_in_s
    big_a = work / dev.speed + 2 * x_out_s
    if model.has_teacher:
        x_in_t = np.array([model.x(j - 1, t.bytes[v], v == 0) for v in range(lt + 1)])
        x_out_t = np.array([model.x(j, t.bytes[v], v == lt) for v in range(lt + 1)])
        b = t.work / dev.speed - x_in_t
        big_b = t.work / dev.speed + x_out_t
    else:
        b = np.zeros(1)
        big_b = np.zeros(1)
    return a, big_a, b, big_b


def _tol(period: float) -> float:
    """Slack for float error when comparing loads with a period (the grid and the backtrack agree)."""
    return 1e-9 * max(abs(period), 1.0)


def _reach(model: Objective, period: float, memory: bool) -> list[np.ndarray] | None:
    """Reachable boundary pairs after each stage at ``period``; None if the end is unreachable."""
    n = len(model.p.devices)
    ls = len(model.s.pos) - 1
    lt = len(model.t.pos) - 1 if model.has_teacher else 0
    budget = period / model.m
    reach = np.zeros((ls + 1, lt + 1), dtype=bool)
    reach[0, 0] = True
    grids = [reach]
    ms, mt = model.s.mem, (model.t.mem if model.has_teacher else np.zeros(1))
    capped = math.isfinite(model.p.student_cap_ms)
    for j in range(n):
        a, big_a, b, big_b = _stage_terms(model, j)
        need = big_a[:, None] + big_b[None, :] - budget  # predecessor potential needed at (u2, v2)
        first, end = model.student_window(j) if capped else (None, None)
        if not memory:
            w = np.where(reach, a[:, None] + b[None, :], -np.inf)
            if model.has_teacher:  # best over v < v2 ...
                w = np.concatenate(
                    [np.full((w.shape[0], 1), -np.inf), np.maximum.accumulate(w, axis=1)[:, :-1]], axis=1
                )
            best = np.full_like(w, -np.inf)  # ... then over u < u2 (within the student cap)
            if first is None:
                best[1:, :] = np.maximum.accumulate(w, axis=0)[:-1, :]
            else:
                best = window_max(w, first)
            nxt = best >= need - _tol(period) / model.m
        else:
            nxt = reach_with_memory(
                reach,
                a,
                b,
                need,
                ms,
                mt,
                model.p.devices[j].memory_bytes,
                model.has_teacher,
                _tol(period) / model.m,
                end,
            )
        # Stage j < n-1 ends on a real cut; the last stage ends at both chains' ends.
        if j < n - 1:
            nxt[-1, :] = False
            if model.has_teacher:
                nxt[:, -1] = False
        else:
            keep = nxt[-1, -1]
            nxt = np.zeros_like(nxt)
            nxt[-1, -1] = keep
        if not nxt.any():
            return None
        reach = nxt
        grids.append(reach)
    return grids


def _backtrack(
    model: Objective, period: float, grids: list[np.ndarray], memory: bool
) -> tuple[list[int], list[int]]:
    """Boundary indices of a partition achieving ``period``, from the reachable grids."""
    n = len(model.p.devices)
    u2, v2 = grids[-1].shape[0] - 1, grids[-1].shape[1] - 1
    su, tv = [], []
    for j in range(n - 1, -1, -1):
        found = None
        for u, v in zip(*np.nonzero(grids[j]), strict=False):
            if u >= u2 or (model.has_teacher and v >= v2):
                continue
            load, mem = model.stage(j, int(u), u2, int(v), v2)
            if (
                load <= period + 2 * _tol(period)
                and (not memory or mem <= model.p.devices[j].memory_bytes * (1 + 1e-12))
                and model.within_cap(j, int(u), u2)
            ):
                found = (int(u), int(v))
                break
        assert found is not None, "reachable grid without a predecessor"
        u2, v2 = found
        if j > 0:
            su.append(u2)
            tv.append(v2)
    return su[::-1], tv[::-1]


def _solve_mirror(model: Objective) -> Partition | None:
    """Paired cuts: exact DP over one boundary index, O(n C^2)."""
    n = len(model.p.devices)
    last = len(model.s.pos) - 1
    inf = math.inf
    f = [0.0] + [inf] * last  # f[c]: best period with the stages so far ending at boundary c
    parents: list[list[int]] = []
    for j in range(n):
        g = [inf] * (last + 1)
        par = [-1] * (last + 1)
        targets = [last] if j == n - 1 else range(1, last)
        for c2 in targets:
            for c in range(c2):
                if f[c] == inf:
                    continue
                load, mem = model.stage(j, c, c2, c, c2)
                if mem > model.p.devices[j].memory_bytes * (1 + 1e-12) or not model.within_cap(j, c, c2):
                    continue
                val = max(f[c], load)
                if val < g[c2]:
                    g[c2], par[c2] = val, c
        f = g
        parents.append(par)
    if f[last] == inf:
        return None
    idx = [last]
    for j in range(n - 1, 0, -1):
        idx.append(parents[j][idx[-1]])
    idx = idx[::-1][:-1]
    return evaluate(model.p, [model.s.pos[c] for c in idx], [model.t.pos[c] for c in idx])
