"""Beyond the min-max load: partitions checked against their stages run whole and against the
schedule they will run.

Stage timing. Node costs come from nodes run one at a time (or from a model of them); a stage runs its nodes
back to back, where caches, the allocator and autograd's bookkeeping make it cost more or less
than their sum (on this project's CPU a stage's backward ran up to 1.9x the sum of its nodes';
on an H100 ResNet stages ran up to 1.5x). :func:`time_stages` runs each student stage's forward
and backward and each teacher stage's forward on one micro-batch, round after round, every
stage once per round, so a slow spell of a noisy machine falls on all stages alike; the medians
are what :func:`tspipe_fx.compile` (``refine=``) scales each stage's node costs to before it
partitions again.

Schedule polish. The partitioner minimises the busiest device's load; a schedule adds waits the
load does not see. Under ``tspipe`` on two devices, device 0 runs its student forwards, then the
next batch's teacher forwards, then waits for the first gradient, which device 1 sends after its
own forward, loss and backward of that micro-batch: a partition that leaves little teacher on
device 0 idles it there, however even the loads. Many partitions share the optimum's load
within a few percent; :func:`polish` walks from the optimum to neighbouring cuts (every cut
moved a few candidate positions either way) while the simulated period of the schedule
(:mod:`tspipe_fx.simulate`, the same per-stage costs and links) gets shorter.
"""

from __future__ import annotations

import copy
import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tspipe_fx.errors import TspipeError
from tspipe_fx.partition import Partition, Problem, evaluate, stage_costs
from tspipe_fx.passes.measure import Timer
from tspipe_fx.runtime import _written_inputs
from tspipe_fx.schedule import Schedule
from tspipe_fx.simulate import simulate_stages
from tspipe_fx.split import Stage

__all__ = ["StageTimes", "at_batch", "polish", "simulated_period", "time_stages"]


@dataclass(frozen=True)
class StageTimes:
    """Median milliseconds per micro-batch of each stage, as run whole."""

    student_fwd_ms: tuple[float, ...]
    student_bwd_ms: tuple[float, ...]
    teacher_fwd_ms: tuple[float, ...]

    def loads_ms(self, micro_batches: int) -> list[float]:
        """Each device's compute per batch (no transfers)."""
        return [
            micro_batches * (f + b + t)
            for f, b, t in zip(self.student_fwd_ms, self.student_bwd_ms, self.teacher_fwd_ms, strict=True)
        ]


def time_stages(
    student: Sequence[Stage],
    teacher: Sequence[Stage],
    student_inputs: Sequence[Any],
    teacher_inputs: Sequence[Any],
    device: torch.device | str,
    *,
    repeats: int = 5,
    warmup: int = 1,
) -> StageTimes:
    """Time every stage whole on ``device``, on copies (the models' buffers stay as they are).

    Args:
        student, teacher: the stages of each model, in order.
        student_inputs, teacher_inputs: one micro-batch, as each model's flat graph inputs.
        repeats: timed rounds (the medians are kept); warmup: untimed rounds first.
    """
    if repeats < 1 or warmup < 0:
        raise TspipeError(f"time_stages needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device)
    timer = Timer(device)
    s_mods = [copy.deepcopy(s.module).to(device) for s in student]
    t_mods = [copy.deepcopy(t.module).to(device) for t in teacher]
    written = [_written_inputs(m) for m in s_mods]
    samples: dict[tuple[str, int], list[float]] = {}

    def record(kind: str, j: int, ms: float, r: int) -> None:
        if r >= warmup:
            samples.setdefault((kind, j), []).append(ms)

    for r in range(warmup + repeats):
        env: dict[str, Any] = dict(zip(student[0].inputs, _on(student_inputs, device), strict=True))
        roots: list[tuple[int, list[torch.Tensor]]] = []
        for j, (stage, mod) in enumerate(zip(student, s_mods, strict=True)):
            # A stage's inputs are leaves, as received; those an in-place op writes are cloned
            # inside the timed call, as the runtime does.
            args = [_leaf(env[n]) for n in stage.inputs]
            call = [
                a.clone() if n in written[j] and a.requires_grad else a
                for n, a in zip(stage.inputs, args, strict=True)
            ]
            out: tuple[Any, ...] = ()

            def forward(mod: Any = mod, call: list[Any] = call) -> None:
                nonlocal out
                out = tuple(mod(*call))

            record("sf", j, timer.once(forward), r)
            roots.append((j, [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]))
            env.update(zip(stage.outputs, out, strict=True))
        for j, outs in reversed(roots):  # each stage's backward from its own outputs
            if not outs:
                record("sb", j, 0.0, r)
                continue
            grads = [torch.ones_like(o) for o in outs]

            def backward(outs: list[torch.Tensor] = outs, grads: list[torch.Tensor] = grads) -> None:
                torch.autograd.backward(outs, grads)

            record("sb", j, timer.once(backward), r)
        env = dict(zip(teacher[0].inputs, _on(teacher_inputs, device), strict=True))
        with torch.no_grad():
            for j, (stage, mod) in enumerate(zip(teacher, t_mods, strict=True)):
                args = [env[n] for n in stage.inputs]
                t_out: tuple[Any, ...] = ()

                def t_forward(mod: Any = mod, args: list[Any] = args) -> None:
                    nonlocal t_out
                    t_out = tuple(mod(*args))

                record("tf", j, timer.once(t_forward), r)
                env.update(zip(stage.outputs, t_out, strict=True))

    def medians(kind: str, n: int) -> tuple[float, ...]:
        return tuple(statistics.median(samples[(kind, j)]) for j in range(n))

    return StageTimes(medians("sf", len(student)), medians("sb", len(student)), medians("tf", len(teacher)))


def at_batch(inputs: Sequence[Any], batch: int, size: int) -> list[Any]:
    """``inputs`` (flat, batch-first) cut or repeated from ``batch`` to ``size`` samples."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == batch and batch != size:
            reps = -(-size // batch)
            x = x.repeat(reps, *([1] * (x.dim() - 1)))[:size] if reps > 1 else x[:size]
        out.append(x)
    return out


def _on(values: Sequence[Any], device: torch.device) -> list[Any]:
    return [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]


def _leaf(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().requires_grad_(value.requires_grad)


def simulated_period(
    problem: Problem, student_cuts: Sequence[int], teacher_cuts: Sequence[int], schedule: Schedule
) -> float:
    """The steady-state period of ``schedule`` on the stages at these cuts (ms per batch)."""
    if schedule.n_stages != len(problem.devices) or schedule.micro_batches != problem.micro_batches:
        raise TspipeError(
            f"the schedule has {schedule.n_stages} stages and {schedule.micro_batches} micro-batches, the "
            f"problem {len(problem.devices)} and {problem.micro_batches}"
        )
    costs = stage_costs(problem, student_cuts, teacher_cuts)
    return simulate_stages(
        schedule,
        student_fwd_ms=[c.student_fwd_ms for c in costs],
        student_bwd_ms=[c.student_bwd_ms for c in costs],
        teacher_fwd_ms=[c.teacher_fwd_ms for c in costs],
        student_send_ms=[c.student_send_ms for c in costs],
        teacher_send_ms=[c.teacher_send_ms for c in costs],
    ).period


def polish(problem: Problem, start: Partition, schedule: Schedule, *, budget: int = 400) -> Partition:
    """From ``start``, downhill to a partition with a shorter simulated period of ``schedule``
    (first improvement among neighbouring cuts; at most ``budget`` simulations; memory limits
    kept; ties broken by the load)."""
    s_pos = [p for p, _ in problem.student.cuts]
    t_pos = [p for p, _ in problem.teacher.cuts] if problem.teacher is not None else []
    has_t = bool(t_pos) and bool(start.teacher_cuts)
    State = tuple[tuple[int, ...], tuple[int, ...]]

    def score(state: State) -> tuple[float, float] | None:
        sc = [s_pos[i] for i in state[0]]
        tc = [t_pos[i] for i in state[1]]
        part = evaluate(problem, sc, tc)
        if any(
            m > d.memory_bytes * (1 + 1e-12) for m, d in zip(part.memory_bytes, problem.devices, strict=True)
        ):
            return None
        return simulated_period(problem, sc, tc, schedule), part.period_ms

    def moves(state: State) -> list[State]:
        """Every boundary's student and teacher cuts moved alone or together (work shifted one way
        in the student and back in the teacher keeps the loads even); small steps first."""
        steps = (0, -1, 1, -2, 2, -4, 4)
        pairs = [
            (ds, dt) for ds in steps for dt in (steps if has_t and not problem.mirror else (0,)) if ds or dt
        ]
        pairs.sort(key=lambda d: abs(d[0]) + abs(d[1]))
        out = []
        for k in range(len(state[0])):
            for ds, dt in pairs:
                new = [list(state[0]), list(state[1])]
                new[0][k] += ds
                if has_t:
                    new[1][k] += ds if problem.mirror else dt
                if all(
                    _increasing(idx, len(pos)) for idx, pos in zip(new, (s_pos, t_pos), strict=True) if idx
                ):
                    out.append((tuple(new[0]), tuple(new[1])))
        return out

    here: State = (
        tuple(s_pos.index(c) for c in start.student_cuts),
        tuple(t_pos.index(c) for c in start.teacher_cuts) if has_t else (),
    )
    best = score(here)
    if best is None:
        return start
    seen = {here}
    spent = 1
    improved = True
    while improved and spent < budget:  # first improvement: the budget goes further
        improved = False
        for state in moves(here):
            if state in seen:
                continue
            if spent >= budget:
                break
            seen.add(state)
            spent += 1
            value = score(state)
            if value is not None and value < best:
                best, here, improved = value, state, True
                break
    return evaluate(problem, [s_pos[i] for i in here[0]], [t_pos[i] for i in here[1]])


def _increasing(idx: Sequence[int], n: int) -> bool:
    return all(0 <= i < n for i in idx) and all(a < b for a, b in itertools.pairwise(idx))
