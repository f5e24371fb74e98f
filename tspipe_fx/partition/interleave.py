"""Interleaved partitions: two stages per device, balanced by their sum.

One contiguous piece per device cannot balance a chain of coarse nodes: with 16 devices for 12
ViT-B blocks each device's share is 0.75 block, and one MLP product is 0.4 of that share, so
the best contiguous cuts leave the busiest device 1.13x the mean. With virtual stages
(:attr:`~tspipe_fx.schedule.task.Schedule.stages_per_device`) the chain is cut into ``2N``
stages and device ``d`` holds stages ``d`` and ``d + N``: a first stage that ends a little
long is evened out by a second that ends short.

The problem: cuts ``c_0 = 0 < c_1 < … < c_N = X`` of the first half and ``X = e_0 < … < e_N =
n`` of the second, minimising ``max_d w[c_d, c_{d+1}) + w[e_d, e_{d+1})`` within each
device's memory. For a period ``P`` and a middle cut ``X``, device by device, the reachable
pairs ``(c, e)`` are kept as ``f(c)`` = the furthest ``e`` reachable with the first half at
``c`` (further is never worse: what is left shrinks, and the work and memory sums are
monotone), so a check is ``O(N C^2 log C)``; bisection on ``P`` over the middle cuts near half
the work. Momentum chains (``mirror``, one index for both models) only; the reachability
counts work and memory, and the transfers are added when the answer is scored.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from tspipe_fx.partition.objective import Objective, evaluate
from tspipe_fx.partition.problem import Partition, PartitionError, Problem

__all__ = ["device_loads", "interleaved", "per_stage", "stage_problem"]

T = TypeVar("T")


def per_stage(per_device: Sequence[T], stages_per_device: int) -> tuple[T, ...]:
    """Each stage's entry of a per-device sequence: stage ``k`` on device ``k % N``."""
    n = len(per_device)
    return tuple(per_device[k % n] for k in range(n * stages_per_device))


def stage_problem(problem: Problem, stages_per_device: int) -> Problem:
    """The problem with a device per stage: stage ``k`` on ``problem.devices[k % N]``."""
    return dataclasses.replace(
        problem,
        devices=per_stage(problem.devices, stages_per_device),
        recompute_share=per_stage(problem.recompute_share, stages_per_device)
        if problem.recompute_share
        else (),
    )


def device_loads(part: Partition, n_devices: int) -> tuple[list[float], list[float]]:
    """Per device, the loads (ms) and memory (bytes) of its stages, summed."""
    loads = [sum(part.loads_ms[d::n_devices]) for d in range(n_devices)]
    memory = [sum(part.memory_bytes[d::n_devices]) for d in range(n_devices)]
    return loads, memory


def interleaved(problem: Problem, *, stage_slack: float = 0.2) -> Partition:
    """Two stages per device: the cuts of ``stage_problem(problem, 2)`` whose largest device
    sum is the smallest (see the module docstring), scored with the transfers.

    ``stage_slack``: no stage holds more than ``(1 + stage_slack) / 2`` of the period sought
    (the answer's period is the larger of its busiest device's load and that bound).
    Stages of very different sizes balance the devices as well, but the pipeline then runs
    as two pipelines one after the other (a lap of light stages, a lap of heavy ones), and the
    synchronous student waits for the heavy lap's round trip.

    Raises:
        PartitionError: not a mirrored (momentum) problem, too few candidate cuts for twice the
            devices, or no interleaved partition fits the devices' memory.
    """
    if not problem.mirror:
        raise PartitionError(
            "interleaved partitions pair the teacher's cuts with the student's (momentum, mirror=True); "
            "hint: a KD pair keeps one stage per device"
        )
    n = len(problem.devices)
    if len({d.speed for d in problem.devices}) > 1:
        raise PartitionError(
            f"interleaved partitions assume devices of one speed, got {sorted({d.speed for d in problem.devices})}; "
            "hint: one stage per device"
        )
    staged = stage_problem(problem, 2)
    model = Objective(staged)
    pos = model.s.pos
    if len(pos) - 1 < 2 * n:
        raise PartitionError(
            f"the student graph has {len(pos) - 2} candidate cuts: too few for {2 * n} stages; hint: use "
            "fewer devices, or one stage per device"
        )
    per_micro = (model.student_work(0) + model.t.work) / problem.devices[0].speed
    work = per_micro * problem.micro_batches
    memory = model.s.mem + model.t.mem
    limit = min(d.memory_bytes for d in problem.devices)
    total = float(work[-1])
    middles = [i for i in range(n, len(pos) - n) if abs(work[i] - total / 2) <= total / n]
    lo, hi = total / n, total * max(1.0, 2 / (1 + stage_slack))  # hi: any cuts meet it in work
    best: list[int] | None = None
    for _ in range(40):
        mid = (lo + hi) / 2
        found = next(
            (c for x in middles if (c := _reach(work, memory, n, x, mid, limit, stage_slack)) is not None),
            None,
        )
        if found is not None:
            hi, best = mid, found
        else:
            lo = mid
        if hi - lo <= 1e-6 * hi:
            break
    if best is None:
        raise PartitionError(
            f"no interleaved partition into {2 * n} stages fits the devices' memory; hint: one stage per "
            "device, or more memory"
        )
    # (mirrored: the teacher's candidates pair with the student's by index, at its own positions)
    return evaluate(staged, [pos[i] for i in best], [model.t.pos[i] for i in best])


def _reach(
    work: np.ndarray, memory: np.ndarray, n: int, x: int, period: float, limit: float, slack: float
) -> list[int] | None:
    """Boundary indices of ``2n`` stages (first half ending at ``x``) whose device sums keep
    under ``period`` and ``limit``, or None."""
    a_work, b_work = work[: x + 1], work[x:]
    a_mem, b_mem = memory[: x + 1], memory[x:]
    cap = (1 + slack) * period / 2  # the most one stage may hold
    f = np.full(len(a_work), -1)
    f[0] = 0
    back: list[dict[int, tuple[int, int]]] = []
    for d in range(n):
        g = np.full(len(a_work), -1)
        came: dict[int, tuple[int, int]] = {}
        room = n - 1 - d  # stages still to come in each half, each non-empty
        top = x - room
        for c in np.nonzero(f >= 0)[0]:
            e = int(f[c])
            if c + 1 > top:
                continue
            spent = a_work[c + 1 : top + 1] - a_work[c]
            held = a_mem[c + 1 : top + 1] - a_mem[c]
            by_work = np.searchsorted(b_work, b_work[e] + np.minimum(period - spent, cap), side="right") - 1
            by_mem = np.searchsorted(b_mem, b_mem[e] + limit - held, side="right") - 1
            e2 = np.minimum(np.minimum(by_work, by_mem), len(b_work) - 1 - room)
            e2 = np.where((e2 > e) & (spent <= cap) & (held <= limit), e2, -1)
            targets = np.arange(c + 1, top + 1)
            better = e2 > g[targets]
            for c2, v in zip(targets[better], e2[better], strict=True):
                g[c2] = v
                came[int(c2)] = (int(c), e)
        f = g
        back.append(came)
    if f[x] != len(b_work) - 1:
        return None
    first, second = [x], [len(b_work) - 1]
    at = x
    for d in range(n - 1, -1, -1):
        at, reached = back[d][at]
        first.append(at)
        second.append(reached)
    first.reverse()
    second.reverse()
    bounds = first[1:-1] + [x] + [x + e for e in second[1:-1]]
    if any(b <= a for a, b in itertools.pairwise([0, *bounds])):
        return None
    return bounds
