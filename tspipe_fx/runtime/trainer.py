"""``pipe.trainer(...)``: train a compiled pipeline under a schedule on a runtime.

Batches are executed in *windows*: window ``b`` is each device's tasks from just after its
optimizer step of ``b-1`` through its step of ``b``. The ``tspipe`` schedule runs the teacher
forward of batch ``b+1`` inside window ``b``, so window ``b`` can only run once batch ``b+1`` is
known: :meth:`Trainer.step` with batch ``b+1`` runs window ``b`` and returns the loss of batch
``b`` (a :class:`StepLoss` tagged with its batch); :meth:`Trainer.finish` runs the last window.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from tspipe_fx.errors import TspipeError
from tspipe_fx.plan import Plan
from tspipe_fx.runtime.batches import Fed, fed_batch
from tspipe_fx.runtime.local import LocalRuntime
from tspipe_fx.runtime.optim import OptimizerSpec
from tspipe_fx.runtime.options import TrainOptions
from tspipe_fx.runtime.tasks import RuntimeFailure, StageTasks
from tspipe_fx.runtime.teacher import TeacherVersions
from tspipe_fx.schedule.task import Schedule, Task, window_ends
from tspipe_fx.schedule.validator import validate
from tspipe_fx.stage import StagedModel

__all__ = ["StepLoss", "Trainer"]


class StepLoss(NamedTuple):
    """The loss of one batch; it comes back one ``step`` call after its batch."""

    batch: int
    loss: float


# Per user module: the trainer whose batches in flight will write its weights into it.
_WRITERS: weakref.WeakKeyDictionary[nn.Module, weakref.ReferenceType[Trainer]] = weakref.WeakKeyDictionary()


@dataclass
class _Pending:
    index: int
    data: Fed


class Trainer:
    """Train a staged student (and teacher) under the plan's schedule on a runtime.

    Made by :meth:`tspipe_fx.Pipeline.trainer`; the options are :class:`TrainOptions`' fields.

    Args:
        plan: the compiled plan: devices, and the schedule, micro-batches, views and staleness
            trained with (``schedule=`` and the options override them).
        student, teacher: the staged models.
        loss_fn: ``loss_fn(student_out, teacher_out, target)``, or with two views
            ``loss_fn(s1, s2, t1, t2)``; outputs as the models return them, joined over the batch.
        optimizer: a factory ``params -> optimizer``, or an optimizer over the student's parameters.
        schedule: ``auto``, ``tspipe``, ``gpipe``, ``1f1b`` or ``sequential`` (default: the plan's).
        runtime: ``"local"`` (one process, a thread per device) or ``"dist"`` (one rank per device
            under torchrun).
        timeout_s: how long a task waits for its inputs before the step fails.
    """

    def __init__(
        self,
        plan: Plan,
        student: StagedModel,
        teacher: StagedModel,
        loss_fn: Callable[..., torch.Tensor],
        *,
        optimizer: OptimizerSpec,
        schedule: str | None = None,
        runtime: str = "local",
        timeout_s: float = 60.0,
        **options: Any,
    ):
        if runtime not in ("local", "dist"):
            raise TspipeError(
                f"runtime must be 'local' (one process, a thread per device) or 'dist' (one rank per "
                f"device under torchrun), got {runtime!r}"
            )
        opts = TrainOptions.of(optimizer, options, where="trainer()")
        # What the costs priced: the plan's precision and recompute, unless told otherwise.
        recompute = opts.recompute if opts.recompute is not None else plan.recompute or "never"
        per_stage = (recompute,) * plan.n_stages if isinstance(recompute, str) else tuple(recompute)
        if len(per_stage) != plan.n_stages:
            raise TspipeError(
                f"recompute names {len(per_stage)} policies for {plan.n_stages} stages: {list(per_stage)}; "
                "hint: one policy for every stage ('except_last'), or one per stage"
            )
        opts = dataclasses.replace(opts, precision=opts.precision or plan.precision, recompute=per_stage)
        self.plan = dataclasses.replace(
            plan,
            schedule=schedule if schedule is not None else plan.schedule,
            micro_batches=opts.micro_batches or plan.micro_batches,
            views=opts.views or plan.views,
            staleness=opts.staleness if opts.staleness is not None else plan.staleness,
            loss=opts.loss or plan.loss,
            teacher_parts=opts.teacher_parts
            or (plan.teacher_parts if (schedule or plan.schedule) == "auto" else 1),
            precision=opts.precision or plan.precision,
            recompute=per_stage,
        )
        if self.plan.stages_per_device > 1:
            _refuse_on_virtual_stages(self.plan, opts, student.ties, runtime)
        self.student, self.teacher = student, teacher
        self.n = self.plan.n_stages
        # Every window is cut from one of three short schedules (1, 2 or 3 batches): built once,
        # the longest proven once.
        self.schedules: dict[int, Schedule] = {k: self.plan.build_schedule(k) for k in (1, 2, 3)}
        validate(self.schedules[3])
        longest = self.schedules[3]
        self.m, self.views, self.mode, self.staleness = (
            longest.micro_batches, longest.views, longest.mode, longest.staleness,
        )  # fmt: skip
        self.versions = TeacherVersions(self.mode, self.staleness, opts.momentum, opts.ema_buffers)
        common: dict[str, Any] = dict(
            schedule=longest, options=opts, versions=self.versions, timeout_s=timeout_s
        )
        self.runtime: StageTasks
        if runtime == "dist":
            from tspipe_fx.runtime.dist.layout import init
            from tspipe_fx.runtime.dist.runtime import DistRuntime

            layout, device = init(self.plan.n_devices, self.plan.stages_per_device)
            self.runtime = DistRuntime(student, teacher, layout, device, loss_fn, **common)
        else:
            devices = [torch.device(d) for d in self.plan.devices]
            self.runtime = LocalRuntime(student, teacher, devices, loss_fn, **common)
        # The order micro-batches pass each stage (BatchNorm statistics depend on it); a
        # ReferenceTrainer with micro_major=... reproduces it: micro-batch-major where the loss is
        # per micro-batch (it needs every view of its micro-batch).
        self.micro_major = longest.micro_major
        self.loss, self.teacher_parts = longest.loss, longest.teacher_parts
        self.pending: _Pending | None = None
        self.next_index = 0
        self.segment_start = 0

    # --- schedule windows -------------------------------------------------------------------

    def window(self, index: int, last: bool) -> list[list[Task]]:
        """Device lists of the window of batch ``index``, cut from a short schedule and renumbered.

        Windows count from the start of the current run of batches: the first one (after
        construction, ``finish`` or a resume) has the prologue, the teacher forward of its batch.
        """
        b = index - self.segment_start
        s = self.schedules[(1 if b == 0 else 2) if last else (2 if b == 0 else 3)]
        local = min(b, 1)  # window 0 of a short schedule, or its window 1 renumbered
        shift = index - local
        out = []
        for tasks in s.devices:
            ends = window_ends(tasks)
            lo = ends[local - 1] + 1 if local > 0 else 0
            hi = ends[local] + 1
            out.append([t.with_batch(t.batch + shift) for t in tasks[lo:hi]])
        return out

    # --- public -----------------------------------------------------------------------------

    def step(
        self,
        *inputs: Any,
        target: Any = None,
        teacher_inputs: Any = None,
        teacher_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> StepLoss | None:
        """Feed one batch; returns the loss of the batch before it (None on the first call).

        ``inputs`` and ``kwargs`` are the student's call; the teacher gets the same, or its own
        inputs for the same samples (``teacher_inputs``: a tensor or a tuple of positional
        arguments, ``teacher_kwargs``), as it was compiled with ``teacher_example_inputs``.
        """
        data = fed_batch(self.views, self.m, inputs, kwargs, target, teacher_inputs, teacher_kwargs,
                         self.teacher_parts)  # fmt: skip
        for model, role in ((self.student, False), (self.teacher, True)):
            model.io.flatten_inputs(*data.inputs(role, 0, 0))  # a batch a model cannot take fails here
        current = _Pending(self.next_index, data)
        if self.pending is None:
            self._claim_modules()
            self.segment_start = self.next_index
        self.next_index += 1
        previous, self.pending = self.pending, current
        if previous is None:
            return None
        return self._run(previous, current)

    def _claim_modules(self) -> None:
        """Refuse to train while another trainer with batches in flight will write the same modules."""
        homes = [m for m in (self.student.home, self.teacher.home) if m is not None]
        for home in homes:
            ref = _WRITERS.get(home)
            other = ref() if ref is not None else None
            if other is not None and other is not self and other.pending is not None:
                raise TspipeError(
                    f"another trainer of these models ({type(home).__name__}) has batches in flight, and "
                    "both would write their trained weights into your modules; hint: call finish() on the "
                    "other trainer first, or compile deep copies of the models for an independent pipeline"
                )
        for home in homes:
            _WRITERS[home] = weakref.ref(self)

    def finish(self) -> StepLoss | None:
        """Run the last fed batch to the end (its backward and optimizer step), then bring the
        trained weights home to the user's modules (:meth:`sync_to_modules`)."""
        previous, self.pending = self.pending, None
        result = self._run(previous, None) if previous is not None else None
        self.sync_to_modules()
        return result

    def _run(self, batch: _Pending, nxt: _Pending | None) -> StepLoss:
        lists = self.window(batch.index, last=nxt is None)
        data = {batch.index: batch.data}
        if nxt is not None:
            data[nxt.index] = nxt.data
        first, drains = batch.index == self.segment_start, nxt is None
        self.versions.start_window(batch.index, first=first, drains=drains)
        self.runtime.prepare(batch.data)
        try:
            self.runtime.run(lists, data)
        except RuntimeFailure as e:
            e.add_note(self._recover(sorted(data)))
            raise
        self.versions.end_window(first=first, drains=drains)
        self.runtime.end_window(batch.index)
        return StepLoss(batch.index, self.runtime.losses.pop(batch.index))

    def _recover(self, lost: list[int]) -> str:
        """After a failed window: back to the state after the last completed optimizer step,
        the window's batches dropped; returns what the user is told."""
        self.pending = None  # the next step starts a new run of batches
        which = ("batch " if len(lost) == 1 else "batches ") + " and ".join(str(b) for b in lost)
        if not self.runtime.recover():
            return (
                f"{which} not trained, and the stages are no longer at one step: "
                "load a checkpoint (load_checkpoint) to go on"
            )
        self.versions.abort_window()
        return (
            f"{which} not trained; the trainer is back at the state after its last "
            "optimizer step: step() takes the next batch, and finish(), save_checkpoint() and "
            "sync_to_modules() work"
        )

    def update_momentum(self, m: float) -> None:
        """Set the EMA momentum for the next optimizer steps (cosine schedules)."""
        self.versions.set_momentum(m)

    @torch.no_grad()
    def sync_to_modules(self, student: nn.Module | None = None, teacher: nn.Module | None = None) -> None:
        """Copy the trained weights (parameters and buffers) into the user's modules (those given
        to ``compile``, or the ones passed here)."""
        for module, which in (
            (student or self.student.home, "student"),
            (teacher or self.teacher.home, "teacher"),
        ):
            if module is None:
                continue
            target = module.state_dict(keep_vars=True)
            for state in self.runtime.stage_state_dicts(which):
                for name, value in state.items():
                    if name in target:
                        target[name].copy_(value.to(target[name].device))

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: stage weights, optimizers, schedulers, EMA momentum, step, loss scale."""
        if self.pending is not None:
            raise TspipeError("a batch is still in flight: call finish() before state_dict()")
        self.runtime.drain()
        return {
            "stages": [d.index for d in self.runtime.devices],  # those this process holds
            "student": [copy.deepcopy(d.student.state_dict()) for d in self.runtime.devices],
            "teacher": [copy.deepcopy(d.teacher.state_dict()) for d in self.runtime.devices],
            "optimizers": [d.optimizer.state_dict() if d.optimizer else None for d in self.runtime.devices],
            "schedulers": [d.scheduler.state_dict() if d.scheduler else None for d in self.runtime.devices],
            "teacher_prev": [self.versions.kept.get(d.index) for d in self.runtime.devices],
            "momentum": self.versions.momentum,
            "next_index": self.next_index,
            "loss_scale": self.runtime.loss_scale.state_dict()
            if self.runtime.loss_scale is not None
            else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for d, s, t, o, sch in zip(self.runtime.devices, state["student"], state["teacher"], state["optimizers"],
                                   state["schedulers"], strict=True):  # fmt: skip
            d.student.load_state_dict(s)
            d.teacher.load_state_dict(t)
            if d.optimizer and o:
                d.optimizer.load_state_dict(o)
            if d.scheduler and sch:
                d.scheduler.load_state_dict(sch)
        self.versions.kept = {
            d.index: prev
            for d, prev in zip(
                self.runtime.devices, state.get("teacher_prev") or [None] * self.n, strict=False
            )
            if prev is not None
        }
        self.versions.set_momentum(state["momentum"])
        self.next_index = state["next_index"]
        if self.runtime.loss_scale is not None and state.get("loss_scale") is not None:
            self.runtime.loss_scale.load_state_dict(state["loss_scale"])


def _refuse_on_virtual_stages(plan: Plan, opts: TrainOptions, ties: Sequence[Any], runtime: str) -> None:
    """What a plan with several stages per device cannot train with, named."""
    v, n = plan.stages_per_device, plan.n_devices
    hint = "hint: a plan with one stage per device (compile(..., stages_per_device=1))"
    if runtime == "dist" and n == 1:
        raise TspipeError(f"the plan holds {v} stages on its one device, and runtime='dist' sends a stage's "
                          f"messages to another rank; {hint}, or runtime='local'")  # fmt: skip
    if opts.clip_grad_norm is not None or plan.precision == "fp16":
        raise TspipeError(
            f"gradient clipping and fp16's loss scale take every stage's gradient norms at each step, and a device "
            f"holding {v} stages steps one before the other's backward is done; got clip_grad_norm="
            f"{opts.clip_grad_norm!r}, precision={plan.precision!r}; {hint}, or bf16 without clipping"
        )
    for names, stages in ties:  # the owner hands the new value to its copies after its step
        if len({j % n for j in stages}) < len(stages):
            raise TspipeError(
                f"the tied tensors {list(names)} sit on stages {list(stages)}, two of them on one device: the "
                f"copy's step would wait for the owner's, later on the same device; {hint}"
            )
