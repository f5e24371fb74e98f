"""Stages timed whole: what compile's ``refine=`` rescales node costs to.

Node costs come from nodes run one at a time (or from a model of them); a stage runs its nodes
back to back, where caches, the allocator and autograd's bookkeeping make it cost more or less
than their sum (on this project's CPU a stage's backward ran up to 1.9x the sum of its nodes';
on an H100 ResNet stages ran up to 1.5x). :func:`time_stages` runs each student stage's forward
and backward and each teacher stage's forward on one micro-batch, round after round, every
stage once per round, so a slow spell of a noisy machine falls on all stages alike (each
student stage's backward also split in two, as the zero-bubble schedules run it:
:mod:`tspipe_fx.runtime.split_backward`, whose extra autograd calls and repeated kernel set-up
cost ~17% more than one backward on a ResNet stage of this project's CPU); the medians are what :func:`tspipe_fx.compile` (``refine=``) scales each stage's node costs to before it
partitions again.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tspipe_fx.errors import TspipeError
from tspipe_fx.passes.timer import Timer
from tspipe_fx.runtime.split_backward import WeightWork, input_gradients, weight_gradients
from tspipe_fx.schedule.costs import at_least_whole
from tspipe_fx.stage import Stage

__all__ = ["StageTimes", "at_batch", "copied_to", "time_stages"]


@dataclass(frozen=True)
class StageTimes:
    """Median milliseconds per micro-batch of each stage, as run whole."""

    student_fwd_ms: tuple[float, ...]
    student_bwd_ms: tuple[float, ...]
    teacher_fwd_ms: tuple[float, ...]
    # the backward split as the zero-bubble schedules run it: input gradients, then weights'
    student_input_grad_ms: tuple[float, ...] = ()
    student_weight_grad_ms: tuple[float, ...] = ()

    def split_shares(self) -> tuple[tuple[float, float], ...]:
        """Per student stage, its split backward's halves as shares of its whole backward (their
        sum above 1 is what splitting costs); empty where the split was not timed. The same
        gradients in two calls cannot cost less than in one: halves timed below the whole are
        timing noise, and are raised in proportion to add up to it (a period priced on them came
        out shorter than the busiest device's compute)."""
        return tuple(
            at_least_whole(i / b, w / b) if b > 0 else (0.0, 1.0)
            for i, w, b in zip(
                self.student_input_grad_ms, self.student_weight_grad_ms, self.student_bwd_ms, strict=False
            )
        )

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
    samples: dict[tuple[str, int], list[float]] = {}

    def record(kind: str, j: int, ms: float, r: int) -> None:
        if r >= warmup:
            samples.setdefault((kind, j), []).append(ms)

    for r in range(warmup + repeats):
        env: dict[str, Any] = dict(zip(student[0].inputs, copied_to(student_inputs, device), strict=True))
        roots: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []
        for j, (stage, mod) in enumerate(zip(student, s_mods, strict=True)):
            # A stage's inputs are leaves, as received; those an in-place op writes are cloned
            # inside the timed call, as the runtime does.
            args = [_leaf(env[n]) for n in stage.inputs]
            call = [
                a.clone() if n in stage.written_inputs and a.requires_grad else a
                for n, a in zip(stage.inputs, args, strict=True)
            ]
            out: tuple[Any, ...] = ()

            def forward(mod: Any = mod, call: list[Any] = call) -> None:
                nonlocal out
                out = tuple(mod(*call))

            record("sf", j, timer.once(forward), r)
            outs = [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]
            roots.append((j, outs, [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]))
            env.update(zip(stage.outputs, out, strict=True))
        work: list[WeightWork] = []  # (the input half's hand-over to the weight half)
        for j, outs, leaves in reversed(roots):  # each stage's backward from its own outputs
            if not outs:
                for kind in ("sb", "si", "sw"):
                    record(kind, j, 0.0, r)
                continue
            grads = [torch.ones_like(o) for o in outs]
            params = [p for p in s_mods[j].parameters() if p.requires_grad]

            def whole(outs: list[torch.Tensor] = outs, grads: list[torch.Tensor] = grads) -> None:
                torch.autograd.backward(outs, grads, retain_graph=True)

            def inputs_half(outs: list[torch.Tensor] = outs, grads: list[torch.Tensor] = grads,
                            leaves: list[torch.Tensor] = leaves, params: list[Any] = params,
                            work: list[WeightWork] = work) -> None:  # fmt: skip
                work.append(input_gradients(outs, grads, leaves, params)[1])

            def weights_half(work: list[WeightWork] = work) -> None:
                weight_gradients(work.pop(), retain_graph=True)

            # On one graph (kept): the whole backward and the split one's halves, in turn first.
            halves: list[tuple[str, Callable[[], None]]] = [("si", inputs_half), ("sw", weights_half)]
            for kind, run in [("sb", whole), *halves] if r % 2 else [*halves, ("sb", whole)]:
                record(kind, j, timer.once(run), r)
        env = dict(zip(teacher[0].inputs, copied_to(teacher_inputs, device), strict=True))
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

    n = len(student)
    return StageTimes(medians("sf", n), medians("sb", n), medians("tf", len(teacher)), medians("si", n),
                      medians("sw", n))  # fmt: skip


def at_batch(inputs: Sequence[Any], batch: int, size: int) -> list[Any]:
    """``inputs`` (flat, batch-first) cut or repeated from ``batch`` to ``size`` samples."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == batch and batch != size:
            reps = -(-size // batch)
            x = x.repeat(reps, *([1] * (x.dim() - 1)))[:size] if reps > 1 else x[:size]
        out.append(x)
    return out


def copied_to(values: Sequence[Any], device: torch.device) -> list[Any]:
    """Copies of the tensors among ``values`` on ``device`` (the rest as they are)."""
    return [
        v.to(device, copy=True) if isinstance(v, torch.Tensor) else v for v in values
    ]  # the user's stay as they are


def _leaf(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().requires_grad_(value.requires_grad)
