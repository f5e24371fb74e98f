"""The task code both runtimes run: a stage's teacher forward, student forward, loss, backward
and optimizer step, on the devices one process holds.

Each device holds its own copies of one student stage and one teacher stage. A stage's forward
outputs, detached, go to the next stage, which makes them leaves that require grad where they
did; its backward sends the gradients of those leaves back. The last device computes the loss
once per batch over the whole batch (or once per micro-batch, where the schedule says so) and
hands each micro-batch's output gradients to its backward.

Forwards and the loss run under the run's precision (:mod:`.precision`: autocast, the compute
dtype across boundaries, the fp16 loss scale) and draw their random numbers by identity
(:mod:`.randomness`). How messages travel and how stages agree (gradient norms, tied weights,
replicas) is the runtime's (:class:`~tspipe_fx.runtime.channels.Channels`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.batches import Fed, batch_size, join_micro, to_device, tree_to_device
from tspipe_fx.runtime.board import Board
from tspipe_fx.runtime.channels import Channels, inbound
from tspipe_fx.runtime.compiled import CompileGate, check_toolchain, checked_compile, compile_stages, shapes
from tspipe_fx.runtime.device import DeviceState, call_stage
from tspipe_fx.runtime.loss_terms import gather_outputs, micro_term
from tspipe_fx.runtime.optim import build_optimizer, clip_, optimizer_params, parameter_names
from tspipe_fx.runtime.options import TrainOptions
from tspipe_fx.runtime.precision import LossScale, Precision
from tspipe_fx.runtime.randomness import ModelDraws, draw_counts
from tspipe_fx.runtime.recompute import dropped_activations, frozen_buffers, recomputes
from tspipe_fx.runtime.split_backward import input_gradients, weight_gradients
from tspipe_fx.runtime.teacher import TeacherVersions
from tspipe_fx.schedule.task import Schedule, Task
from tspipe_fx.stage import ModelIO, Stage, StagedModel

__all__ = ["RuntimeFailure", "StageTasks", "checked_loss"]


class RuntimeFailure(TspipeError):
    """A task failed on a device; the message names where, the cause is chained."""


def checked_loss(value: Any) -> torch.Tensor:
    """The loss function's result, if it is a one-element tensor autograd can start from."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = (
            f"a tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise TspipeError(
            f"the loss function must return a one-element tensor, got {got}; hint: compute the loss "
            "with torch operations and reduce it (.mean()), without .item() or float()"
        )
    return value


class StageTasks(Channels):
    """The tasks of the stages this process holds (see the module docstring).

    Args:
        student, teacher: the staged models (their stages are copied onto the devices).
        devices: one per stage.
        loss_fn: ``(student_out, teacher_out, target)`` or, with two views, ``(s1, s2, t1, t2)``;
            with ``micro_full_teacher`` also ``rows=`` (the student rows' slice of the batch).
        schedule: the schedule the windows come from (views, mode, loss granularity).
        options: the optimizer, LR scheduler and clipping.
        versions: the momentum teacher's EMA and stale reads.
        timeout_s: how long a task waits for a message before it gives up.
        held: the stages this process runs (default: all).
    """

    def __init__(
        self,
        student: StagedModel,
        teacher: StagedModel,
        devices: Sequence[torch.device],
        loss_fn: Callable[..., torch.Tensor],
        *,
        schedule: Schedule,
        options: TrainOptions,
        versions: TeacherVersions,
        timeout_s: float,
        held: Sequence[int] | None = None,
    ):
        self.student, self.teacher = student, teacher
        self.loss_fn, self.views, self.mode = loss_fn, schedule.views, schedule.mode
        self.versions, self.clip = versions, options.clip_grad_norm
        self.timeout_s = timeout_s
        self.loss_per_micro, self.loss = schedule.loss_per_micro, schedule.loss
        self.split_backward, self.teacher_parts = schedule.split_backward, schedule.teacher_parts
        self.micro_batches = schedule.micro_batches
        self.loss_terms: dict[int, int] = {}  # per batch, the loss tasks done (micro_full_teacher)
        self.param_order = [n for n, _ in student.parameters.named_parameters()]
        self.n_stages = len(student.stages)
        # The stages this process runs (all of them here; one per rank in the distributed runtime).
        self.devices: list[DeviceState] = []
        for j in range(self.n_stages) if held is None else held:
            s, t, dev = student.stages[j], teacher.stages[j], torch.device(devices[j])
            self.devices.append(
                DeviceState(j, dev, copy.deepcopy(s.module).to(dev), copy.deepcopy(t.module).to(dev), s, t)
            )
        self.stage = {d.index: d for d in self.devices}
        for d in self.devices:
            if d.device.type == "cuda":
                d.stream = torch.cuda.Stream(d.device)  # type: ignore[no-untyped-call]
        # Tied student tensors: the first stage holding one owns it; the others hold copies.
        self.ties = list(student.ties)
        self.not_owned = {(k, n) for names, stages in self.ties for k in stages[1:] for n in names}
        originals = parameter_names(student.parameters)
        for d in self.devices:
            params = self.owned_parameters(d.index, d.student)
            d.optimizer = build_optimizer(options.optimizer, params, originals) if params else None
            d.scheduler = options.lr_scheduler(d.optimizer) if options.lr_scheduler and d.optimizer else None
        self.seed = options.seed
        self.precision = Precision(options.precision or "fp32")
        self.teacher_precision = Precision(options.teacher_precision or self.precision.name)
        # fp16: the loss scale, one for every stage; a batch's inf decision, taken at its steps
        self.loss_scale = LossScale() if options.precision == "fp16" else None
        self.found_inf: dict[int, bool] = {}
        policy = options.recompute or "never"  # per stage
        self.recompute = (policy,) * self.n_stages if isinstance(policy, str) else tuple(policy)
        self.compile_mode = checked_compile(options.compile_stages)
        self.gate = CompileGate(self.compile_mode is not None)  # compiles run one at a time
        # A compiled stage is one autograd node: nothing to split (its sw tasks have no work).
        self.split_backward = self.split_backward and self.compile_mode is None
        if self.compile_mode is not None:
            check_toolchain([d.device for d in self.devices])
        # Per model (0 student, 1 teacher): each stage's random operations per forward (counted
        # at the first batch: prepare); a stage's draws are seeded by their identity.
        self.draws: dict[int, ModelDraws] = {}
        self.losses: dict[int, float] = {}
        self.broken: RuntimeFailure | None = None
        self.stepped: set[int] = set()  # the stages that took their optimizer step in this window

    def owned_parameters(self, stage: int, module: nn.Module) -> dict[str, nn.Parameter]:
        """The trainable parameters stage ``stage``'s optimizer steps (not the tied copies)."""
        return {
            n: p for n, p in module.named_parameters() if p.requires_grad and (stage, n) not in self.not_owned
        }

    def prepare(self, fed: Fed) -> None:
        """Once, before the first window: how many random operations each stage's forward runs;
        then the stages that draw none are compiled, where asked."""
        if self.draws:
            return
        for key, model in enumerate((self.student, self.teacher)):
            flat = model.io.flatten_inputs(*fed.inputs(key == 1, 0, 0))
            self.draws[key] = ModelDraws(key, tuple(draw_counts(model.stages, flat)))
        if self.compile_mode is not None:
            compile_stages(self.devices, self.draws, self.compile_mode)

    def run_task(self, d: DeviceState, task: Task, data: dict[int, Fed], board: Board) -> None:
        """Run one task of device ``d``'s list; autocast is the task's own, not the caller's. A
        profiler's trace names the task (``stage 0 sf3.0.1``)."""
        with (
            torch.profiler.record_function(f"stage {d.index} {task}"),
            torch.autocast(device_type=d.device.type, enabled=False),
        ):
            getattr(self, f"_{task.kind}")(d, task, data, board)

    def _inputs(
        self, d: DeviceState, model: ModelIO, io: Stage, t: Task, data: dict[int, Fed], board: Board
    ) -> dict[str, Any]:
        if d.index == 0:
            flat = model.flatten_inputs(*data[t.batch].inputs(t.kind == "tf", t.view, t.micro))
            values = {name: to_device(x, d.device) for name, x in zip(io.inputs, flat, strict=True)}
            for name in io.written_inputs:  # the batch is the user's, and its micro-batches are views
                if isinstance(values.get(name), torch.Tensor):  # of one tensor: autograd sees every write
                    values[name] = values[name].clone()
            return values
        received = self.receive(d, board, inbound(t, self.n_stages))
        return {name: received[name] for name in io.inputs}

    def _tf(self, d: DeviceState, t: Task, data: dict[int, Fed], board: Board) -> None:
        received = self._inputs(d, self.teacher.io, d.t_io, t, data, board)
        values = received if d.index == 0 else {n: to_device(v, d.device) for n, (v, _) in received.items()}
        args = [values[n] for n in d.t_io.inputs]
        with (
            torch.no_grad(),
            self.draws[1].seeded(self.seed, d.index, t.batch, t.view, t.micro),
            self.teacher_precision.autocast(d.device),
        ):
            kept = self.versions.weights_for(d.index, t.batch)
            with self.gate.call(("tf", d.index, shapes(args), kept is not None)):
                if kept is not None:  # a one-step-late teacher across a drained pipeline
                    out = tuple(torch.func.functional_call(d.teacher, kept, tuple(args), strict=False))
                else:
                    out = call_stage(d.teacher, args, f"teacher stage {d.index}")
        if d.index == self.n_stages - 1:
            d.teacher_out[(t.batch, t.view, t.micro)] = out
        else:
            self.send(
                d,
                board,
                ("tf", d.index, t.batch, t.view, t.micro),
                {
                    n: (self.teacher_precision.boundary(o), False)
                    for n, o in zip(d.t_io.outputs, out, strict=True)
                },
            )

    def _sf(self, d: DeviceState, t: Task, data: dict[int, Fed], board: Board) -> None:
        received = self._inputs(d, self.student.io, d.s_io, t, data, board)
        replayed = recomputes(self.recompute[d.index], t.micro, self.micro_batches)
        leaves, out = self._student_forward(d, t, received, saves=not replayed)
        if replayed:  # its backward runs it again
            d.replays[(t.batch, t.view, t.micro)] = received if d.index > 0 else None
        d.saved[(t.batch, t.view, t.micro)] = (leaves, out)
        if d.index == self.n_stages - 1:
            d.student_out[(t.batch, t.view, t.micro)] = out
            return
        sent = {
            name: (self.precision.boundary(o.detach()), o.requires_grad)
            if isinstance(o, torch.Tensor)
            else (o, False)
            for name, o in zip(d.s_io.outputs, out, strict=True)
        }
        self.send(d, board, ("sf", d.index, t.batch, t.view, t.micro), sent)

    def _student_forward(
        self, d: DeviceState, t: Task, received: dict[str, Any], *, saves: bool = True, replay: bool = False
    ) -> tuple[dict[str, torch.Tensor], tuple[Any, ...]]:
        """Stage ``d``'s student forward of ``received`` (stage 0: the values; later stages: (value,
        whether it requires grad)): the leaves whose gradients go back, and the outputs. Without
        ``saves`` (a forward to be recomputed) it keeps no activation; ``replay``: the recompute,
        whose activations the backward uses (BatchNorm statistics move in the first run only; the
        draws repeat: seeded)."""
        leaves: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        for name, item in received.items():
            x, needs_grad = (item, False) if d.index == 0 else (to_device(item[0], d.device), item[1])
            if needs_grad:
                x = leaves[name] = x.detach().requires_grad_()
            if d.index > 0 and name in d.s_io.written_inputs:  # a leaf cannot be written; a replay
                with torch.enable_grad():  # needs the value the first run saw
                    x = x.clone()
            values[name] = x
        with (
            torch.enable_grad(),
            self.draws[0].seeded(self.seed, d.index, t.batch, t.view, t.micro),
            self.precision.autocast(d.device),
            frozen_buffers(d.student) if replay else contextlib.nullcontext(),
            contextlib.nullcontext() if saves else dropped_activations(),
            self.gate.call(("sf", d.index, shapes(values.values()), replay)),
        ):
            out = call_stage(d.student, [values[n] for n in d.s_io.inputs], f"student stage {d.index}")
        return leaves, out

    def _loss(self, d: DeviceState, t: Task, data: dict[int, Fed], board: Board) -> None:
        b = t.batch
        args, target = data[b].student_args, data[b].target
        micro = sorted(
            {(v, m) for (bb, v, m) in d.student_out if bb == b and (not self.loss_per_micro or m == t.micro)}
        )
        weight, extra = 1.0, dict[str, Any]()
        full_teacher = self.loss == "micro_full_teacher"
        if self.loss_per_micro:
            sizes = [batch_size(a) for a in args[0]]
            weight, target, extra = micro_term(sizes, target, t.micro, full_teacher)
        s_parts, t_parts, leaves = gather_outputs(
            d.student_out, d.teacher_out, b, micro, self.views, teacher_parts=self.teacher_parts,
            full_teacher=self.micro_batches * self.teacher_parts if full_teacher else None,
        )  # fmt: skip
        per_view_s = [self.student.io.unflatten_outputs(join_micro(p)) for p in s_parts]
        per_view_t = [self.teacher.io.unflatten_outputs(join_micro(p)) for p in t_parts]
        with torch.enable_grad():
            with self.precision.autocast(d.device):
                if self.views == 1:
                    loss = self.loss_fn(
                        per_view_s[0], per_view_t[0], tree_to_device(target, d.device), **extra
                    )
                else:
                    loss = self.loss_fn(*per_view_s, *per_view_t, **extra)
            loss = checked_loss(loss).float() * weight
            value = float(loss.detach())
            if not math.isfinite(value):  # before a gradient of it leaves
                raise FloatingPointError(f"the loss of batch {b} is {value}")
            if self.loss_scale is not None:
                loss = loss * self.loss_scale.scale
            keys = list(leaves)
            grads = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True) if keys else ()
        for (v, m, i), g in zip(keys, grads, strict=True):
            board.put(("grad", b, v, m, i), g)
        for v, m in micro:  # outputs without a gradient still need a message
            for i in range(len(d.s_io.outputs)):
                if (v, m, i) not in leaves:
                    board.put(("grad", b, v, m, i), None)
        self.losses[b] = self.losses.get(b, 0.0) + value
        if full_teacher:
            self.loss_terms[b] = self.loss_terms.get(b, 0) + 1
            if self.loss_terms[b] == self.micro_batches:
                del self.loss_terms[b]
                for key in [k for k in d.teacher_out if k[0] == b]:
                    del d.teacher_out[key]

    def _sb(self, d: DeviceState, t: Task, data: dict[int, Fed], board: Board) -> None:
        leaves, out = d.saved.pop((t.batch, t.view, t.micro))
        if (t.batch, t.view, t.micro) in d.replays:  # recompute: the forward again, kept this time
            received = d.replays.pop((t.batch, t.view, t.micro))
            if received is None:  # the first stage reads its micro-batch again
                received = self._inputs(d, self.student.io, d.s_io, t, data, board)
            leaves, out = self._student_forward(d, t, received, replay=True)
        if d.index == self.n_stages - 1:
            grads = [board.take(("grad", t.batch, t.view, t.micro, i)) for i in range(len(out))]
        else:
            received = self.receive(d, board, inbound(t, self.n_stages))
            grads = [received.get(name) for name in d.s_io.outputs]
        pairs = [
            (o, to_device(g, o.device).to(o.dtype))  # a gradient crosses in the compute dtype
            for o, g in zip(out, grads, strict=True)
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
        names = list(leaves)
        if self.split_backward:  # input gradients now, the weights' in this stage's sw task
            outs, seeds = [o for o, _ in pairs], [g for _, g in pairs]
            params = [p for p in d.student.parameters() if p.requires_grad]
            dx, work = input_gradients(outs, seeds, [leaves[n] for n in names], params)
            d.weight_work[(t.batch, t.view, t.micro)] = work
            sent = dict(zip(names, dx, strict=True))
        else:
            with self.gate.call(("sb", d.index, shapes(o for o, _ in pairs))):  # a compiled backward
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            sent = {n: leaves[n].grad for n in names}
        if d.index > 0:
            self.send(d, board, ("sb", d.index, t.batch, t.view, t.micro), sent)

    def _sw(self, d: DeviceState, t: Task, data: dict[int, Fed], board: Board) -> None:
        if self.split_backward:
            weight_gradients(d.weight_work.pop((t.batch, t.view, t.micro)))

    def _opt(self, d: DeviceState, t: Task, data: dict[int, Fed], board: Board) -> None:
        for names, stages in self.ties:  # the owner sums its copies' gradients
            if d.index in stages:
                self.sum_tied(d, names, stages, board)
        self.reduce_replicas(d)
        skip = False
        if self.clip is not None or self.loss_scale is not None:
            owned = {id(q) for q in optimizer_params(d.optimizer)}
            grads = {
                n: p.grad for n, p in d.student.named_parameters() if p.grad is not None and id(p) in owned
            }
            if self.loss_scale is not None:
                for g in grads.values():
                    g.mul_(1.0 / self.loss_scale.scale)
            # Every stage's gradient norms: the global norm, and an inf anywhere skips every stage.
            norms = self.all_norms(
                d, t.batch, {n: torch.linalg.vector_norm(g).cpu() for n, g in grads.items()}, board
            )
            if self.loss_scale is not None:
                skip = self.found_inf[t.batch] = not all(bool(torch.isfinite(v)) for v in norms.values())
            if self.clip is not None and not skip:
                clip_(grads, norms, self.param_order, self.clip)
        self.stepped.add(d.index)  # from here on, a failed window cannot be undone
        if d.optimizer is not None:
            if not skip:
                d.optimizer.step()
            if d.scheduler is not None:
                d.scheduler.step()
            d.optimizer.zero_grad(set_to_none=True)
        for names, stages in self.ties:  # ... and hands out the new value
            if d.index in stages:
                self.copy_tied(d, names, stages, board)
        self.versions.update(d.index, d.teacher, d.student)

    def end_window(self, batch: int) -> None:
        """After the window of ``batch`` ran on every stage: the loss scale takes its decision."""
        if self.loss_scale is not None:
            self.loss_scale.update(self.found_inf.pop(batch))

    def recover(self) -> bool:
        """After a failed window, put every stage back as it was after its last optimizer step:
        the window's activations, gradients and partial losses are dropped. False where that
        cannot be done (a stage had already stepped in the window): the runtime stays broken."""
        if self.broken is None:
            return True
        if self.stepped:
            return False
        for d in self.devices:
            d.saved.clear()
            d.teacher_out.clear()
            d.student_out.clear()
            d.weight_work.clear()
            d.replays.clear()
            d.student.zero_grad(set_to_none=True)
        self.losses.clear()
        self.loss_terms.clear()
        self.broken = None
        return True
