"""What a device holds in memory under its task list: the recompute policies, the micro-batches in
flight, and a device's predicted peak by part.

A student forward (``sf``) leaves its micro-batch's activations on the device until that
micro-batch's backward frees them (``sb``; ``sw`` where the backward is split). Under
recompute the forward keeps only its inputs, and the backward task replays it, holding the
activations again until they are freed. :func:`busiest` walks a device's list and finds the
moment it holds the most bytes (with its weight gradients and the running task's working set); :class:`StageMemory` is a device's whole predicted peak
(``tspipe_fx.partition.memory`` adds the parameters, optimizer state and working sets).

Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tspipe_fx.errors import TspipeError
from tspipe_fx.schedule.task import Task

__all__ = [
    "RECOMPUTE",
    "Moment",
    "Sizes",
    "StageMemory",
    "busiest",
    "checked_recompute",
    "recomputes",
    "replay_share",
]

# A stage's recompute policy: "never" keeps every micro-batch's activations until its backward,
# "always" recomputes every one, "except_last" all but the batch's last (torchgpipe's default:
# its backward comes soonest).
RECOMPUTE = ("never", "always", "except_last")


def checked_recompute(value: object, *, auto: bool = False) -> str:
    """``value`` if it is a recompute policy (or ``"auto"``, where the planner may choose)."""
    allowed = [*RECOMPUTE, "auto"] if auto else list(RECOMPUTE)
    if value not in allowed:
        raise TspipeError(
            f"recompute must be one of {allowed}, got {value!r}; hint: 'except_last' saves the activations "
            "of all but the last micro-batch at the cost of one more forward each"
        )
    return str(value)


def recomputes(policy: str, micro: int, micro_batches: int) -> bool:
    """Whether micro-batch ``micro`` of a batch is recomputed under ``policy``."""
    return policy == "always" or (policy == "except_last" and micro != micro_batches - 1)


@dataclass(frozen=True)
class Sizes:
    """What one device's tasks hold, in bytes (per micro-batch where it says so)."""

    activations: float  # a micro-batch's saved activations, with its input and output
    inputs: float  # a micro-batch's input (what a recomputed one keeps)
    gradients: float  # the student stage's weight gradients
    student_working: float  # values alive within one student forward or backward
    accumulation: float  # a backward's new weight gradients before they are added to ``.grad``
    teacher_working: float  # values alive within one teacher forward


@dataclass(frozen=True)
class Moment:
    """A device's busiest moment: micro-batches holding their activations, those holding only
    their inputs (recomputed, waiting for their backward), whether the weight gradients exist,
    and the running task's own working set."""

    whole: int
    inputs_only: int
    gradients: bool
    working: float

    @property
    def in_flight(self) -> int:
        return self.whole + self.inputs_only


def busiest(
    tasks: Sequence[Task], *, split_backward: bool, micro_batches: int, policy: str, sizes: Sizes
) -> Moment:
    """Walk a device's task list; the moment it holds the most bytes.

    A forward adds its micro-batch; the backward that makes the weight gradients (``sb``, or
    ``sw`` where the backward is split) holds them from then until the optimizer step (which sets
    them to None), and every later one adds its new gradients into them through temporaries
    (``sizes.accumulation``); the backward that ends a micro-batch frees it."""
    freed_by = "sw" if split_backward else "sb"
    whole: set[tuple[int, int, int]] = set()
    inputs: set[tuple[int, int, int]] = set()
    grads = False
    best, best_bytes = Moment(0, 0, False, 0.0), -1.0

    def note(working: float, gradients: bool) -> None:
        nonlocal best, best_bytes
        size = (len(whole) * sizes.activations + len(inputs) * sizes.inputs + working
                + (sizes.gradients if gradients else 0.0))  # fmt: skip
        if size > best_bytes:
            best, best_bytes = Moment(len(whole), len(inputs), gradients, working), size

    for t in tasks:
        key = (t.batch, t.view, t.micro)
        if t.kind == "sf":
            (inputs if recomputes(policy, t.micro, micro_batches) else whole).add(key)
            note(sizes.student_working, grads)
        elif t.kind == "tf":
            note(sizes.teacher_working, grads)
        elif t.kind == "sb" and key in inputs:  # the replay holds the activations again
            inputs.discard(key)
            whole.add(key)
        if t.kind == freed_by:  # the weight gradients are made (or added to) here
            note(sizes.student_working + (sizes.accumulation if grads else 0.0), True)
            grads = True
            whole.discard(key)
            inputs.discard(key)
        elif t.kind == "sb":  # the input half of a split backward
            note(sizes.student_working, grads)
        elif t.kind == "opt":
            grads = False
    return best


@dataclass(frozen=True)
class StageMemory:
    """One device's predicted peak, by part, in bytes."""

    student_params: float
    gradients: float  # the weight gradients, where they exist at that moment
    optimizer_state: float
    teacher_params: float
    activations: float  # saved for backward by the micro-batches in flight at the busiest moment
    boundaries: float  # their inputs received and outputs sent (the cut buffers)
    working: float  # the running task's own transient values (a forward, a backward's gradients)
    in_flight: int  # student micro-batches held at that moment
    recompute: str = "never"

    @property
    def total(self) -> float:
        return (
            self.student_params + self.gradients + self.optimizer_state + self.teacher_params
            + self.activations + self.boundaries + self.working
        )  # fmt: skip


def replay_share(policy: str, micro_batches: int) -> float:
    """The share of a stage's student forwards that its backward runs again under ``policy``."""
    return sum(recomputes(policy, m, micro_batches) for m in range(micro_batches)) / micro_batches
