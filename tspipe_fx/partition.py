"""Exact min-max partition of a student chain and a teacher chain into pipeline stages.

No torch here: the compiler hands over plain per-node numbers (see :class:`Chain`), this module
hands back cut positions. The problem (DESIGN.md section 4): device ``j`` holds one contiguous
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

The same :func:`evaluate` scores every partition: the solver's answer, the brute force in the
tests, manual balances and the baseline policies in reports.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from tspipe_fx.errors import TspipeError

__all__ = [
    "Chain",
    "Device",
    "Partition",
    "PartitionError",
    "Problem",
    "StageCost",
    "brute_force",
    "evaluate",
    "solve",
    "stage_costs",
]


class PartitionError(TspipeError):
    """No partition fits, or the partition request is malformed."""


@dataclass(frozen=True)
class Chain:
    """One model as the partitioner sees it: nodes in topological order, candidate cuts.

    A cut at position ``p`` (``0 < p < n``) puts nodes ``[.., p)`` before it and ``[p, ..)``
    after it; ``cuts`` lists the allowed positions with the bytes that cross them.
    """

    fwd_ms: tuple[float, ...]
    bwd_ms: tuple[float, ...]
    param_bytes: tuple[int, ...]
    act_bytes: tuple[int, ...]  # activations kept for backward, per micro-batch
    cuts: tuple[tuple[int, int], ...]  # (position, bytes crossing), increasing positions

    def __post_init__(self) -> None:
        n = len(self.fwd_ms)
        if not (len(self.bwd_ms) == len(self.param_bytes) == len(self.act_bytes) == n):
            raise PartitionError(
                f"chain lists differ in length: fwd {n}, bwd {len(self.bwd_ms)}, params "
                f"{len(self.param_bytes)}, activations {len(self.act_bytes)}"
            )
        positions = [p for p, _ in self.cuts]
        if positions != sorted(set(positions)) or any(not 0 < p < n for p in positions):
            raise PartitionError(
                f"cut positions must increase strictly within 1..{n - 1}, got {positions[:10]}..."
            )

    @property
    def n(self) -> int:
        return len(self.fwd_ms)

    @classmethod
    def uniform(cls, costs: Sequence[float], *, cut_bytes: Sequence[int] | None = None) -> Chain:
        """A chain with forward costs ``costs``, no backward, a cut allowed between every node."""
        n = len(costs)
        cb = list(cut_bytes) if cut_bytes is not None else [0] * (n - 1)
        return cls(tuple(costs), (0.0,) * n, (0,) * n, (0,) * n, tuple((p, cb[p - 1]) for p in range(1, n)))


@dataclass(frozen=True)
class Device:
    """One pipeline device: relative speed, memory and the link to the next device."""

    speed: float = 1.0  # relative to the device the costs were measured on
    memory_bytes: float = math.inf
    link_gbs: float = math.inf  # to the next device, GB/s
    link_latency_ms: float = 0.0


@dataclass(frozen=True)
class Problem:
    """What to partition, onto what."""

    student: Chain
    teacher: Chain | None
    devices: tuple[Device, ...]
    micro_batches: int = 1
    optimizer_factor: float = 2.0  # optimizer state per parameter byte: Adam 2, SGD+momentum 1
    in_flight: int | None = None  # student micro-batches whose activations a device holds (default M)
    teacher_fwd_only: bool = True  # the teacher's backward is never run (KD, momentum)
    mirror: bool = False  # momentum: teacher cuts paired with the student's by index


@dataclass(frozen=True)
class Partition:
    """Cut positions of both chains and what they cost."""

    student_cuts: tuple[int, ...]
    teacher_cuts: tuple[int, ...]
    loads_ms: tuple[float, ...]
    memory_bytes: tuple[float, ...]

    @property
    def period_ms(self) -> float:
        return max(self.loads_ms)


# --- the objective ---------------------------------------------------------------------------


class _Prefix:
    """Prefix sums of one chain at the boundaries ``0, cut positions..., n``."""

    def __init__(self, chain: Chain, *, with_bwd: bool, params_factor: float, in_flight: int):
        self.pos = [0] + [p for p, _ in chain.cuts] + [chain.n]
        self.bytes = [0] + [b for _, b in chain.cuts] + [0]
        work = np.cumsum(
            [0.0] + [f + (b if with_bwd else 0.0) for f, b in zip(chain.fwd_ms, chain.bwd_ms, strict=False)]
        )
        mem = np.cumsum(
            [0.0]
            + [
                p * params_factor + a * in_flight
                for p, a in zip(chain.param_bytes, chain.act_bytes, strict=False)
            ]
        )
        self.work = work[self.pos]
        self.mem = mem[self.pos]
        self.index = {p: i for i, p in enumerate(self.pos)}


def _link_ms(dev: Device, nbytes: float) -> float:
    if nbytes <= 0 and dev.link_latency_ms == 0:
        return 0.0
    return nbytes / (dev.link_gbs * 1e6) + dev.link_latency_ms


class _Model:
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

    def x(self, link: int, nbytes: float, at_end: bool) -> float:
        """Transfer time over the link after device ``link``; no transfer at a chain's ends."""
        if at_end or link < 0 or link >= len(self.p.devices) - 1:
            return 0.0
        return _link_ms(self.p.devices[link], nbytes)

    def stage(self, j: int, u: int, u2: int, v: int, v2: int) -> tuple[float, float]:
        """(load ms, memory bytes) of device ``j`` holding boundary indices ``[u, u2)``, ``[v, v2)``."""
        dev = self.p.devices[j]
        s, t = self.s, self.t
        last_s, last_t = len(s.pos) - 1, len(t.pos) - 1
        work = (s.work[u2] - s.work[u]) + (t.work[v2] - t.work[v] if self.has_teacher else 0.0)
        comm = 2 * (self.x(j - 1, s.bytes[u], u == 0) + self.x(j, s.bytes[u2], u2 == last_s))
        if self.has_teacher:
            comm += self.x(j - 1, t.bytes[v], v == 0) + self.x(j, t.bytes[v2], v2 == last_t)
        mem = (s.mem[u2] - s.mem[u]) + (t.mem[v2] - t.mem[v] if self.has_teacher else 0.0)
        return self.m * (work / dev.speed + comm), mem


def evaluate(problem: Problem, student_cuts: Sequence[int], teacher_cuts: Sequence[int] = ()) -> Partition:
    """Score given cut positions (``n_devices - 1`` per chain) under the problem's model."""
    model = _Model(problem)
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


@dataclass(frozen=True)
class StageCost:
    """One device's share of a partition, per micro-batch: the schedule simulator's task costs."""

    student_fwd_ms: float
    student_bwd_ms: float
    teacher_fwd_ms: float
    student_send_ms: float  # an activation (or its gradient) over the link to the next device
    teacher_send_ms: float


def stage_costs(
    problem: Problem, student_cuts: Sequence[int], teacher_cuts: Sequence[int] = ()
) -> list[StageCost]:
    """Per device, what the stages at these cuts cost (speeds and links applied)."""
    evaluate(problem, student_cuts, teacher_cuts)  # the same checks of the cuts
    n = len(problem.devices)
    out = []

    def bounds(chain: Chain, cuts: Sequence[int]) -> list[int]:
        return [0, *cuts, chain.n] if chain.n else [0] * (n + 1)

    teacher = problem.teacher or Chain((), (), (), (), ())
    sb, tb = bounds(problem.student, student_cuts), bounds(teacher, teacher_cuts)
    s_bytes, t_bytes = dict(problem.student.cuts), dict(teacher.cuts)
    for j, dev in enumerate(problem.devices):
        last = j == n - 1
        out.append(
            StageCost(
                sum(problem.student.fwd_ms[sb[j] : sb[j + 1]]) / dev.speed,
                sum(problem.student.bwd_ms[sb[j] : sb[j + 1]]) / dev.speed,
                sum(teacher.fwd_ms[tb[j] : tb[j + 1]]) / dev.speed,
                0.0 if last else _link_ms(dev, s_bytes[sb[j + 1]]),
                0.0 if last or not teacher.n else _link_ms(dev, t_bytes[tb[j + 1]]),
            )
        )
    return out


def _fits(problem: Problem, part: Partition) -> bool:
    return all(
        m <= d.memory_bytes * (1 + 1e-12) for m, d in zip(part.memory_bytes, problem.devices, strict=False)
    )


# --- solvers ---------------------------------------------------------------------------------


def solve(problem: Problem) -> Partition:
    """The partition with the smallest period that fits every device's memory.

    Raises:
        PartitionError: too few candidate cuts for the devices, or no partition fits in memory
            (the message states the smallest memory per device that would work).
    """
    model = _Model(problem)
    n = len(problem.devices)
    for name, prefix, needed in (("student", model.s, True), ("teacher", model.t, model.has_teacher)):
        if needed and len(prefix.pos) - 1 < n:
            raise PartitionError(
                f"the {name} graph has {len(prefix.pos) - 2} candidate cuts: too few for {n} stages; "
                "hint: use fewer devices, or allow more cut positions"
            )
    if problem.mirror:
        if not model.has_teacher or len(model.s.pos) != len(model.t.pos):
            raise PartitionError("mirror needs a teacher chain with as many candidate cuts as the student's")
        best = _solve_mirror(model)
    else:
        best = _solve_pair(model, memory=False)
        if best is not None and not _fits(problem, best):
            # The unconstrained optimum bounds the constrained one from below.
            best = _solve_pair(model, memory=True, lower=best.period_ms)
    if best is None:
        need = _min_uniform_memory(problem)
        raise PartitionError(
            f"no partition fits the devices' memory ({_fmt_bytes(min(d.memory_bytes for d in problem.devices))} "
            f"on the smallest); the smallest memory per device that would work is {_fmt_bytes(need)}; hint: "
            "more devices, fewer micro-batches in flight, or a memory_limit of at least that"
        )
    return best


def _fmt_bytes(b: float) -> str:
    if math.isinf(b):
        return "unlimited"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit} ({math.ceil(b):,} bytes)"
    return f"{math.ceil(b):,} bytes"


def _min_uniform_memory(problem: Problem) -> float:
    """The smallest equal per-device memory for which a partition exists (min-max memory)."""

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
    return solve(swapped).period_ms


def _solve_pair(model: _Model, *, memory: bool, lower: float = 0.0) -> Partition | None:
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


def _bracket(model: _Model, memory: bool, lower: float) -> tuple[float, list[np.ndarray] | None]:
    """A feasible period and its grids: just above a known lower bound if possible, else the upper bound."""
    if lower > 0:  # the constrained optimum is usually close to the unconstrained one
        for step in (1e-3, 1e-2, 1e-1, 1.0):
            grids = _reach(model, lower * (1 + step), memory)
            if grids is not None:
                return lower * (1 + step), grids
    hi = _upper_bound(model)
    return hi, _reach(model, hi, memory)


def _upper_bound(model: _Model) -> float:
    """A period no partition exceeds: all the work on the slowest device, every transfer at its worst."""
    dev = model.p.devices
    slowest = min(d.speed for d in dev)
    work = model.s.work[-1] + (model.t.work[-1] if model.has_teacher else 0.0)
    worst = max(
        (model.x(j, b, False) for j in range(len(dev) - 1) for b in [*model.s.bytes, *model.t.bytes]),
        default=0.0,
    )
    return model.m * (work / slowest + 6 * worst) * (1 + 1e-6) + 1e-9


def _stage_terms(model: _Model, j: int) -> tuple[np.ndarray, ...]:
    """Per-boundary terms of stage ``j``: cost = M*(A[u2] + B[v2] - a[u] - b[v])."""
    dev = model.p.devices[j]
    s, t = model.s, model.t
    ls, lt = len(s.pos) - 1, len(t.pos) - 1
    x_in_s = np.array([model.x(j - 1, s.bytes[u], u == 0) for u in range(ls + 1)])
    x_out_s = np.array([model.x(j, s.bytes[u], u == ls) for u in range(ls + 1)])
    a = s.work / dev.speed - 2 * x_in_s
    big_a = s.work / dev.speed + 2 * x_out_s
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


def _reach(model: _Model, period: float, memory: bool) -> list[np.ndarray] | None:
    """Reachable boundary pairs after each stage at ``period``; None if the end is unreachable."""
    n = len(model.p.devices)
    ls = len(model.s.pos) - 1
    lt = len(model.t.pos) - 1 if model.has_teacher else 0
    budget = period / model.m
    reach = np.zeros((ls + 1, lt + 1), dtype=bool)
    reach[0, 0] = True
    grids = [reach]
    ms, mt = model.s.mem, (model.t.mem if model.has_teacher else np.zeros(1))
    for j in range(n):
        a, big_a, b, big_b = _stage_terms(model, j)
        need = big_a[:, None] + big_b[None, :] - budget  # predecessor potential needed at (u2, v2)
        if not memory:
            w = np.where(reach, a[:, None] + b[None, :], -np.inf)
            pm = np.maximum.accumulate(np.maximum.accumulate(w, axis=0), axis=1)
            best = np.full_like(pm, -np.inf)
            if model.has_teacher:
                best[1:, 1:] = pm[:-1, :-1]
            else:
                best[1:, :] = pm[:-1, :]
            nxt = best >= need - _tol(period) / model.m
        else:
            nxt = _reach_memory(
                reach,
                a,
                b,
                need,
                ms,
                mt,
                model.p.devices[j].memory_bytes,
                model.has_teacher,
                _tol(period) / model.m,
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


def _reach_memory(
    reach: np.ndarray, a: np.ndarray, b: np.ndarray, need: np.ndarray, ms: np.ndarray, mt: np.ndarray,
    limit: float, pair: bool, tol: float,
) -> np.ndarray:  # fmt: skip
    """The reachable grid with the memory bound: per source row, a range maximum over ``v``."""
    ls1, lt1 = need.shape
    out = np.zeros_like(reach)
    for u in np.flatnonzero(reach.any(axis=1)):
        row = np.where(reach[u], b, -np.inf)  # potential b(v) of reachable (u, v)
        table = _sparse_table(row)
        u2 = np.arange(u + 1, ls1)
        if not len(u2):
            continue
        if not pair:
            ok_mem = ms[u2] - ms[u] <= limit * (1 + 1e-12)
            ok = (a[u] + row[0] >= need[u2, 0] - tol) & ok_mem
            out[u2, 0] |= ok
            continue
        # memory: mt[v] >= mt[v2] + ms[u2] - ms[u] - limit  ->  v >= vmin (mt is non-decreasing)
        slack = limit * (1 + 1e-12) - (ms[u2] - ms[u])  # memory left for the teacher segment
        fits = slack >= 0
        u2, slack = u2[fits], slack[fits]
        if not len(u2):
            continue
        # Rows where even the whole teacher prefix fits need no lower bound: a prefix maximum.
        free = slack >= mt[-1] - mt[0]
        prefix = np.concatenate(([-np.inf], np.maximum.accumulate(row)[:-1]))  # max over v < v2
        if free.any():
            out[u2[free], :] |= a[u] + prefix[None, :] >= need[u2[free], :] - tol
        bound = u2[~free]
        if len(bound):
            thr = mt[None, :] - slack[~free][:, None]
            vmin = np.searchsorted(mt, thr, side="left")
            v2 = np.arange(lt1)[None, :].repeat(len(bound), axis=0)
            best = _range_max(table, vmin, v2)  # max over v in [vmin, v2)
            out[bound, :] |= a[u] + best >= need[bound, :] - tol
    return out


def _sparse_table(row: np.ndarray) -> list[np.ndarray]:
    table = [row]
    k = 1
    while 2 * k <= len(row):
        prev = table[-1]
        table.append(np.maximum(prev[:-k], prev[k:]))
        k *= 2
    return table


def _range_max(table: list[np.ndarray], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """max(row[lo:hi]) elementwise; -inf for empty ranges."""
    length = hi - lo
    out = np.full(lo.shape, -np.inf)
    valid = length > 0
    if not valid.any():
        return out
    lv, hv = lo[valid], hi[valid]
    k = np.floor(np.log2(hv - lv)).astype(int)
    res = np.empty(len(lv))
    for level in np.unique(k):
        sel = k == level
        t = table[level]
        res[sel] = np.maximum(t[lv[sel]], t[hv[sel] - (1 << level)])
    out[valid] = res
    return out


def _backtrack(
    model: _Model, period: float, grids: list[np.ndarray], memory: bool
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
            if load <= period + 2 * _tol(period) and (
                not memory or mem <= model.p.devices[j].memory_bytes * (1 + 1e-12)
            ):
                found = (int(u), int(v))
                break
        assert found is not None, "reachable grid without a predecessor"
        u2, v2 = found
        if j > 0:
            su.append(u2)
            tv.append(v2)
    return su[::-1], tv[::-1]


def _solve_mirror(model: _Model) -> Partition | None:
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
                if mem > model.p.devices[j].memory_bytes * (1 + 1e-12):
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


def brute_force(problem: Problem) -> Partition | None:
    """Every combination of cuts (tests only): the optimum, or None if nothing fits."""
    n = len(problem.devices)
    s_pos = [p for p, _ in problem.student.cuts]
    has_t = problem.teacher is not None and problem.teacher.n > 0
    t_pos = [p for p, _ in problem.teacher.cuts] if has_t and problem.teacher else []
    best: Partition | None = None
    pairs: Iterable[tuple[tuple[int, ...], tuple[int, ...]]]
    if problem.mirror:
        pairs = (
            (tuple(s_pos[i] for i in c), tuple(t_pos[i] for i in c))
            for c in itertools.combinations(range(len(s_pos)), n - 1)
        )
    else:
        pairs = itertools.product(
            itertools.combinations(s_pos, n - 1), itertools.combinations(t_pos, n - 1) if has_t else [()]
        )
    for sc, tc in pairs:
        part = evaluate(problem, sc, tc)
        if _fits(problem, part) and (best is None or part.period_ms < best.period_ms):
            best = part
    return best
