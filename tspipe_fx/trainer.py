"""``pipe.trainer(...)``: train a compiled pipeline under a schedule on a runtime.

Batches are executed in *windows*: window ``b`` is each device's tasks from just after its
optimizer step of ``b-1`` through its step of ``b``. The ``tspipe`` schedule runs the teacher
forward of batch ``b+1`` inside window ``b``, so window ``b`` can only run once batch ``b+1`` is
known: :meth:`Trainer.step` with batch ``b+1`` runs window ``b`` and returns the loss of batch
``b`` (a :class:`StepLoss` tagged with its batch); :meth:`Trainer.finish` runs the last window.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime import LocalRuntime
from tspipe_fx.schedule import Schedule, Task, make_schedule, validate
from tspipe_fx.training import OptimizerSpec, build_optimizer, parameter_names, split_micro, view_inputs

__all__ = ["StepLoss", "Trainer"]


class StepLoss(NamedTuple):
    """The loss of one batch; it comes back one ``step`` call after its batch."""

    batch: int
    loss: float


@dataclass
class _Pending:
    index: int
    data: tuple[list[Any], list[Any], Any]


class Trainer:
    """Train a :class:`~tspipe_fx.Pipeline` (see :meth:`tspipe_fx.Pipeline.trainer`)."""

    def __init__(
        self,
        pipe: Any,
        loss_fn: Callable[..., torch.Tensor],
        *,
        optimizer: OptimizerSpec,
        schedule: str = "tspipe",
        runtime: str = "local",
        micro_batches: int | None = None,
        views: int = 1,
        staleness: int = 1,
        momentum: float = 0.996,
        ema_buffers: bool = False,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        clip_grad_norm: float | None = None,
        timeout_s: float = 60.0,
    ):
        if runtime not in ("local", "dist"):
            raise TspipeError(
                f"runtime must be 'local' (one process, a thread per device) or 'dist' (one rank per "
                f"device under torchrun), got {runtime!r}"
            )
        if runtime == "dist":
            from tspipe_fx import distributed

            layout, device = distributed.init(pipe.plan.n_stages)
            pipe = distributed.agree_on_plan(pipe)
        self.pipe = pipe
        plan = pipe.plan
        self.n = plan.n_stages
        # sequential is the no-micro-batching baseline: one micro-batch per batch.
        self.m = 1 if schedule == "sequential" else (micro_batches or plan.micro_batches)
        self.views = views
        self.mode = plan.mode
        # Every window is cut from one of three short schedules (1, 2 or 3 batches): built once,
        # the longest proven once.
        self.schedules: dict[int, Schedule] = {
            n: make_schedule(
                schedule, self.n, self.m, views=views, mode=self.mode, staleness=staleness, n_batches=n
            )
            for n in (1, 2, 3)
        }
        validate(self.schedules[3])
        self.staleness = self.schedules[3].staleness
        # An optimizer instance is over the user's parameters (or the captured graph's: the same).
        user = pipe.student_module if pipe.student_module is not None else pipe.student.graph_module
        originals = parameter_names(user)

        def make_optimizer(params: dict[str, nn.Parameter]) -> torch.optim.Optimizer | None:
            return build_optimizer(optimizer, params, originals)

        options: dict[str, Any] = dict(
            loss_fn=loss_fn, make_optimizer=make_optimizer, make_scheduler=lr_scheduler, views=views, mode=self.mode,
            momentum=momentum, ema_buffers=ema_buffers, clip_grad_norm=clip_grad_norm, timeout_s=timeout_s,
            loss_per_micro=self.schedules[3].loss_per_micro, param_order=[n for n, _ in user.named_parameters()],
        )  # fmt: skip
        self.runtime: LocalRuntime
        if runtime == "dist":
            self.runtime = distributed.DistRuntime(pipe, layout, device, **options)
        else:
            self.runtime = LocalRuntime(
                pipe.student_io, pipe.teacher_io, pipe.student, pipe.teacher,
                [torch.device(d) for d in plan.devices], **options,
            )  # fmt: skip
        # The order micro-batches pass each stage (BatchNorm statistics depend on it); a
        # ReferenceTrainer with micro_major=... reproduces it. Only 1f1b, with its loss per
        # micro-batch, runs them micro-batch-major.
        self.micro_major = self.schedules[3].loss_per_micro
        self.pending: _Pending | None = None
        self.next_index = 0
        self.segment_start = 0

    # --- schedule windows -------------------------------------------------------------------

    def _window(self, index: int, last: bool) -> list[list[Task]]:
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
            ends = [i for i, t in enumerate(tasks) if t.kind == "opt"]
            lo = ends[local - 1] + 1 if local > 0 else 0
            hi = ends[local] + 1
            out.append([t.with_batch(t.batch + shift) for t in tasks[lo:hi]])
        return out

    # --- public -----------------------------------------------------------------------------

    def _prepare(
        self, inputs: tuple[Any, ...], target: Any, kwargs: dict[str, Any]
    ) -> tuple[list[Any], list[Any], Any]:
        views = view_inputs(self.views, inputs)
        args, kws = [], []
        for v in views:
            micro = split_micro(v, kwargs, self.m)
            args.append([a for a, _ in micro])
            kws.append([k for _, k in micro])
        return args, kws, target

    def step(self, *inputs: Any, target: Any = None, **kwargs: Any) -> StepLoss | None:
        """Feed one batch; returns the loss of the batch before it (None on the first call)."""
        data = self._prepare(inputs, target, kwargs)
        current = _Pending(self.next_index, data)
        if self.pending is None:
            self.segment_start = self.next_index
        self.next_index += 1
        previous, self.pending = self.pending, current
        if previous is None:
            return None
        return self._run(previous, current)

    def finish(self) -> StepLoss | None:
        """Run the last fed batch to the end (its backward and optimizer step), then bring the
        trained weights home to the user's modules (:meth:`sync_to_modules`)."""
        previous, self.pending = self.pending, None
        result = self._run(previous, None) if previous is not None else None
        self.sync_to_modules()
        return result

    def _run(self, batch: _Pending, nxt: _Pending | None) -> StepLoss:
        lists = self._window(batch.index, last=nxt is None)
        data = {batch.index: batch.data}
        if nxt is not None:
            data[nxt.index] = nxt.data
        late = self.mode == "momentum" and self.staleness == 1
        # The window that drains the pipeline keeps the teacher from before its EMA update: the
        # first teacher forward after it (a later step, or a resumed run) must still read it.
        self.runtime.keep_teacher_before_ema = late and nxt is None
        if batch.index == self.segment_start:
            for d in self.runtime.devices:
                d.stale_batch = batch.index if late else None
        self.runtime.run(lists, data)
        if batch.index == self.segment_start and nxt is not None:
            for d in self.runtime.devices:  # read by this window's first teacher forward; done
                d.teacher_prev, d.stale_batch = None, None
        return StepLoss(batch.index, self.runtime.losses.pop(batch.index))

    def update_momentum(self, m: float) -> None:
        """Set the EMA momentum for the next optimizer steps (cosine schedules)."""
        self.runtime.momentum = m

    @torch.no_grad()
    def sync_to_modules(self, student: nn.Module | None = None, teacher: nn.Module | None = None) -> None:
        """Copy the trained weights (parameters and buffers) into the user's modules (those given
        to ``compile``, or the ones passed here)."""
        for module, which in (
            (student or self.pipe.student_module, "student"),
            (teacher or self.pipe.teacher_module, "teacher"),
        ):
            if module is None:
                continue
            target = module.state_dict(keep_vars=True)
            for state in self.runtime.stage_state_dicts(which):
                for name, value in state.items():
                    if name in target:
                        target[name].copy_(value.to(target[name].device))

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: stage weights, optimizers, schedulers, EMA momentum, step."""
        if self.pending is not None:
            raise TspipeError("a batch is still in flight: call finish() before state_dict()")
        self.runtime.drain()
        return {
            "stages": [d.index for d in self.runtime.devices],  # those this process holds
            "student": [copy.deepcopy(d.student.state_dict()) for d in self.runtime.devices],
            "teacher": [copy.deepcopy(d.teacher.state_dict()) for d in self.runtime.devices],
            "optimizers": [d.optimizer.state_dict() if d.optimizer else None for d in self.runtime.devices],
            "schedulers": [d.scheduler.state_dict() if d.scheduler else None for d in self.runtime.devices],
            "teacher_prev": [d.teacher_prev for d in self.runtime.devices],
            "momentum": self.runtime.momentum,
            "next_index": self.next_index,
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
        for d, prev in zip(self.runtime.devices, state.get("teacher_prev") or [None] * self.n, strict=True):
            d.teacher_prev = prev
        self.runtime.momentum = state["momentum"]
        self.next_index = state["next_index"]
