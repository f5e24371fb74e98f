"""Brute force over every combination of cuts: the oracle the solvers are tested against."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from tspipe_fx.partition.objective import evaluate, fits
from tspipe_fx.partition.problem import Partition, Problem

__all__ = ["brute_force"]


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
        if not _within_cap(problem, sc):
            continue
        if fits(problem, part) and (best is None or part.period_ms < best.period_ms):
            best = part
    return best


def _within_cap(problem: Problem, student_cuts: Sequence[int]) -> bool:
    return all(
        (s.fwd_ms * (1 + problem.replay_share(j)) + s.bwd_ms) / d.speed
        <= problem.student_cap_ms * (1 + 1e-12) + 1e-9
        for j, (s, d) in enumerate(
            zip(problem.student.stage_sums(student_cuts), problem.devices, strict=True)
        )
    )
