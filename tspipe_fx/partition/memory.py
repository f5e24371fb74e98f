"""A partition's predicted peak memory per device, under a schedule and recompute policies.

Device ``j``'s peak is its busiest moment (:func:`tspipe_fx.schedule.memory.busiest` walks its
task list), in bytes, activations in the compute dtype:

* always: its student stage's parameters and the optimizer's state (``optimizer_factor`` bytes
  per parameter byte), and its teacher stage's parameters;
* per student micro-batch in flight then (forwarded, its backward not done), the activations its
  forward saved for backward, the input it received and the output it sent (the autograd root of
  its backward); a recomputed micro-batch holds its input only until its backward replays it.
  Under reduced precision a forward also saves the compute-dtype copies of the weights autocast
  cast for it (``weight_copies`` per parameter byte);
* the weight gradients, from the window's first backward to its optimizer step (which sets them
  to None); a later backward makes each weight gradient anew before adding it into them: the
  largest node's, with the workspace its backward takes (``Device.grad_workspace`` copies: a
  convolution's gradient on CPU is made in a blocked layout and converted; oneDNN's AVX2 kernels
  hold four copies, measured on an AMD EPYC);
* the running task's working set: the values alive at its busiest node, for one micro-batch of
  a student forward or backward, or of a teacher forward.

The memory benchmark (``benchmarks/memory``) compares it with measured peaks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tspipe_fx.partition.problem import Chain, Partition, Problem
from tspipe_fx.schedule.memory import Sizes, StageMemory, busiest
from tspipe_fx.schedule.task import Schedule

__all__ = ["predict_memory"]


def _stage_peaks(chain: Chain, cuts: Sequence[int], per_node: Sequence[int] | None = None) -> list[float]:
    """Per stage of ``chain`` cut at ``cuts``: the most bytes alive at one of its nodes (or the
    largest of ``per_node``)."""
    bounds = [0, *cuts, chain.n]
    peaks = per_node if per_node is not None else chain.peak_bytes or (0,) * chain.n
    return [float(max(peaks[a:b], default=0)) for a, b in itertools.pairwise(bounds)]


def _boundaries(chain: Chain, cuts: Sequence[int]) -> list[tuple[float, float]]:
    """Per stage: bytes received (0 for the first) and sent on (0 for the last) per micro-batch."""
    size = dict(chain.cuts)
    edges = [0.0, *(float(size[c]) for c in cuts), 0.0]
    return list(itertools.pairwise(edges))


def predict_memory(
    problem: Problem,
    part: Partition,
    schedule: Schedule,
    *,
    recompute: Sequence[str] = (),
    weight_copies: float = 0.0,
) -> tuple[StageMemory, ...]:
    """Per stage, the predicted peak of ``part`` trained under ``schedule`` (see the module): per
    device, or with virtual stages each of a device's stages alone (the device's peak is at most
    their sum).

    Args:
        problem: the chains (activations and cut bytes in the compute dtype), devices, micro-batches
            and optimizer factor the partition was solved on.
        part: the cuts.
        schedule: the task lists the device runs (a few batches; their steady state is the peak).
        recompute: per device, its policy (empty: ``"never"`` everywhere).
        weight_copies: bytes per parameter byte a forward saves as compute-dtype weights (bf16 and
            fp16: 0.5, fp32: 0).
    """
    n = len(problem.devices)
    policies = tuple(recompute) or ("never",) * n
    teacher = problem.teacher or Chain((), (), (), (), ())
    s_sums = problem.student.stage_sums(part.student_cuts)
    t_params = (
        [float(t.param_bytes) for t in teacher.stage_sums(part.teacher_cuts)] if teacher.n else [0.0] * n
    )
    s_peak = _stage_peaks(problem.student, part.student_cuts)
    s_largest = _stage_peaks(problem.student, part.student_cuts, problem.student.param_bytes)
    t_peak = _stage_peaks(teacher, part.teacher_cuts) if teacher.n else [0.0] * n
    out = []
    for j, (s, (received, sent)) in enumerate(zip(s_sums, _boundaries(problem.student, part.student_cuts),
                                                  strict=True)):  # fmt: skip
        saved = s.act_bytes + weight_copies * s.param_bytes
        sizes = Sizes(
            activations=saved + received + sent,
            inputs=received,
            gradients=float(s.param_bytes),
            student_working=s_peak[j],
            accumulation=(1.0 + problem.devices[j].grad_workspace) * s_largest[j],
            teacher_working=t_peak[j] / schedule.teacher_parts,
        )
        mine = [t for t in schedule.devices[schedule.device_of(j)] if t.stage == j]  # (virtual stages)
        at = busiest(mine, split_backward=schedule.split_backward,
                     micro_batches=schedule.micro_batches, policy=policies[j], sizes=sizes)  # fmt: skip
        out.append(
            StageMemory(
                student_params=float(s.param_bytes),
                gradients=sizes.gradients if at.gradients else 0.0,
                optimizer_state=problem.optimizer_factor * s.param_bytes,
                teacher_params=t_params[j],
                activations=at.whole * saved,
                boundaries=at.whole * (received + sent) + at.inputs_only * received,
                working=at.working,
                in_flight=at.in_flight,
                recompute=policies[j],
            )
        )
    return tuple(out)
