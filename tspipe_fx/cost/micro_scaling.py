"""Micro-batch scaling, measured: what a sample costs at each micro-batch compile weighs.

A profile times every node at one batch; the cost models carry it to other micro-batches by the
nodes' symbolic FLOPs, linearly, so a sample costs the same in a micro-batch of 4 as in one of
16. On a CPU it does not: there the benchmark's ResNet-18 took 1.09x per sample at 8 what it
took at 16 (forward and backward), its ViT-S teacher's forward 1.03x. Choosing the number of
micro-batches on linear costs then favours many small ones, whose fill and drain are shorter.
:func:`measured_scaling` runs each whole model at every candidate micro-batch, the sizes in
turn round after round (a machine whose speed drifts over minutes moves them alike), and gives
per size the factors that carry the linear costs to what was measured (each the median over
rounds of a ratio within one round, seconds apart); compile's ``refine`` applies them before it
chooses M.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from tspipe_fx.cost.stage_times import copied_to
from tspipe_fx.errors import TspipeError
from tspipe_fx.passes.timer import Timer

__all__ = ["Scaling", "measured_scaling"]


@dataclass(frozen=True)
class Scaling:
    """Per-sample time at one micro-batch over that at the costs' own batch (1: linear holds)."""

    student_fwd: float
    student_bwd: float
    teacher_fwd: float


def measured_scaling(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    inputs_at: Callable[[int], tuple[Sequence[Any], Sequence[Any]]],
    base: int,
    sizes: Sequence[int],
    device: torch.device | str,
    *,
    repeats: int = 5,
) -> dict[int, Scaling]:
    """Time both models (copies: the originals' buffers stay as they are) at ``base`` and every
    size, and return each size's :class:`Scaling` against ``base``.

    Args:
        student, teacher: the captured graphs, called on flat inputs.
        inputs_at: a size's flat (student, teacher) inputs.
        base: the batch the costs are linear from (the profiles' example batch).
        sizes: micro-batch sizes to measure.
        repeats: timed rounds after one warm-up round; per size, the median of its rounds' ratios.
    """
    if repeats < 1 or base < 1 or any(s < 1 for s in sizes):
        raise TspipeError(
            f"measured_scaling needs repeats, base and sizes >= 1, got {repeats}, {base}, {list(sizes)}"
        )
    device = torch.device(device)
    timer = Timer(device)
    s_mod, t_mod = copy.deepcopy(student).to(device), copy.deepcopy(teacher).to(device)
    order = sorted({base, *sizes})
    data = {b: tuple(copied_to(xs, device) for xs in inputs_at(b)) for b in order}
    ratios: dict[tuple[str, int], list[float]] = {}
    for r in range(1 + repeats):
        per_sample: dict[tuple[str, int], float] = {}
        for b in order if r % 2 else order[::-1]:
            s_in, t_in = data[b]
            fwd = timer.once(partial(s_mod, *s_in))
            both = timer.once(partial(_forward_backward, s_mod, s_in))
            with torch.no_grad():
                teach = timer.once(partial(t_mod, *t_in))
            for kind, ms in (("sf", fwd), ("sb", max(both - fwd, 0.0)), ("tf", teach)):
                per_sample[(kind, b)] = ms / b
        for (kind, b), ms in per_sample.items():  # within a round: ratios seconds apart
            if r and b in sizes:
                at_base = per_sample[(kind, base)]
                ratios.setdefault((kind, b), []).append(ms / at_base if at_base > 0 else 1.0)

    def median(kind: str, b: int) -> float:
        return statistics.median(ratios[(kind, b)])

    return {b: Scaling(median("sf", b), median("sb", b), median("tf", b)) for b in sizes}


def _forward_backward(module: torch.nn.Module, inputs: Sequence[Any]) -> None:
    outs = [t for t in module(*inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    if outs:
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
    for p in module.parameters():
        p.grad = None
