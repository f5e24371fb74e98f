"""The local runtime: one process, one worker thread per device, executing schedule task lists.

Each device holds its own copies of one student stage and one teacher stage. Values cross stages
through a :class:`Board` (a blocking mailbox keyed by task): a stage's forward outputs, detached,
go to the next stage, which makes them leaves that require grad where they did; its backward
sends the gradients of those leaves back. The last device computes the loss once per batch over
the whole batch and hands each micro-batch's output gradients to its backward.

An exception in any task aborts every worker at its next wait; :meth:`LocalRuntime.run` then
raises a :class:`RuntimeFailure` naming the device, the task and, for a forward, the graph
node, with the original exception chained.
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from tspipe_fx.capture import CapturedModel
from tspipe_fx.errors import TspipeError
from tspipe_fx.passes.measure import may_mutate
from tspipe_fx.schedule import Task
from tspipe_fx.split import Stage, tie_groups
from tspipe_fx.training import ema_update, join_micro, split_tree

__all__ = ["Board", "LocalRuntime", "RuntimeFailure"]


class RuntimeFailure(TspipeError):
    """A task failed on a device; the message names where, the cause is chained."""


class _Aborted(Exception):
    pass


class Board:
    """A blocking mailbox shared by the workers; ``abort`` wakes every waiter."""

    def __init__(self, timeout_s: float):
        self.cond = threading.Condition()
        self.items: dict[Any, Any] = {}
        self.failure: tuple[int, Task, BaseException] | None = None
        self.timeout_s = timeout_s

    def put(self, key: Any, value: Any) -> None:
        with self.cond:
            self.items[key] = value
            self.cond.notify_all()

    def take(self, key: Any, *, keep: bool = False) -> Any:
        """Wait for ``key`` and remove it (or leave it, for values several devices read)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: key in self.items or self.failure is not None, self.timeout_s)
            if self.failure is not None:
                raise _Aborted
            if not ok:
                raise TimeoutError(f"waited {self.timeout_s:.0f} s for {key}")
            return self.items[key] if keep else self.items.pop(key)

    def abort(self, device: int, task: Task, err: BaseException) -> None:
        with self.cond:
            if self.failure is None:
                self.failure = (device, task, err)
            self.cond.notify_all()


@dataclass
class _Device:
    """One device's state: its stage copies, optimizer and the activations in flight."""

    index: int
    device: torch.device
    student: fx.GraphModule
    teacher: fx.GraphModule
    s_io: Stage
    t_io: Stage
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    stream: Any = None  # on a GPU, the stage's own CUDA stream
    # A one-step-late teacher across a drained pipeline (finish, checkpoint): the weights before
    # the last EMA update, which the first teacher forward after it must still read.
    teacher_prev: dict[str, torch.Tensor] | None = None
    stale_batch: int | None = None
    saved: dict[tuple[int, int, int], tuple[dict[str, torch.Tensor], tuple[Any, ...]]] = field(
        default_factory=dict
    )
    teacher_out: dict[tuple[int, int, int], tuple[Any, ...]] = field(default_factory=dict)
    student_out: dict[tuple[int, int, int], tuple[Any, ...]] = field(default_factory=dict)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


class LocalRuntime:
    """Executes windows of schedule task lists on local devices (CPU or CUDA).

    Args:
        student_io, teacher_io: the compiled stages.
        student, teacher: the captured models (for the output structure the loss sees).
        devices: one per stage.
        loss_fn: ``(student_out, teacher_out, target)`` or, with two views, ``(s1, s2, t1, t2)``.
        make_optimizer: builds a stage's optimizer from ``{name: param}`` (or returns None).
    """

    def __init__(
        self,
        student_io: Sequence[Stage],
        teacher_io: Sequence[Stage],
        student: CapturedModel,
        teacher: CapturedModel,
        devices: Sequence[torch.device],
        loss_fn: Callable[..., torch.Tensor],
        *,
        make_optimizer: Callable[[dict[str, nn.Parameter]], torch.optim.Optimizer | None],
        make_scheduler: Callable[[torch.optim.Optimizer], Any] | None,
        views: int,
        mode: str,
        momentum: float,
        ema_buffers: bool,
        clip_grad_norm: float | None,
        timeout_s: float,
        loss_per_micro: bool = False,
        param_order: Sequence[str] = (),
        held: Sequence[int] | None = None,
    ):
        self.student_cap, self.teacher_cap = student, teacher
        self.loss_fn, self.views, self.mode = loss_fn, views, mode
        self.momentum, self.ema_buffers, self.clip = momentum, ema_buffers, clip_grad_norm
        self.timeout_s = timeout_s
        self.loss_per_micro = loss_per_micro
        self.param_order = list(param_order)
        self.n_stages = len(student_io)
        # The stages this process runs (all of them here; one per rank in the distributed runtime).
        self.devices: list[_Device] = []
        for j in range(self.n_stages) if held is None else held:
            s, t, dev = student_io[j], teacher_io[j], torch.device(devices[j])
            self.devices.append(
                _Device(j, dev, copy.deepcopy(s.module).to(dev), copy.deepcopy(t.module).to(dev), s, t)
            )
        self.stage = {d.index: d for d in self.devices}
        for d in self.devices:
            if d.device.type == "cuda":
                d.stream = torch.cuda.Stream(d.device)  # type: ignore[no-untyped-call]
        # Tied student tensors: the first stage holding one owns it; the others hold copies.
        self.ties = [(names, stages) for names, stages in tie_groups(list(student_io))]
        self.not_owned = {(k, n) for names, stages in self.ties for k in stages[1:] for n in names}
        for d in self.devices:
            params = self.owned_parameters(d.index, d.student)
            d.optimizer = make_optimizer(params) if params else None
            d.scheduler = make_scheduler(d.optimizer) if make_scheduler and d.optimizer else None
        # Stage inputs an in-place op writes to (timm's ReLU(inplace=True) right after a cut):
        # their gradient leaves are cloned first, as autograd forbids writing to a leaf.
        self.written: dict[int, set[str]] = {d.index: _written_inputs(d.student) for d in self.devices}
        self.losses: dict[int, float] = {}
        self.broken: RuntimeFailure | None = None
        self.keep_teacher_before_ema = False

    def owned_parameters(self, stage: int, module: nn.Module) -> dict[str, nn.Parameter]:
        """The trainable parameters stage ``stage``'s optimizer steps (not the tied copies)."""
        return {
            n: p for n, p in module.named_parameters() if p.requires_grad and (stage, n) not in self.not_owned
        }

    # --- running a window -----------------------------------------------------------------

    def run(
        self,
        lists: Sequence[Sequence[Task]],
        data: dict[int, tuple[list[Any], list[Any], Any]],
    ) -> None:
        """Run one window: ``lists[j]`` on device ``j``; ``data[b]`` = (view args, kwargs, target)."""
        if self.broken is not None:
            raise RuntimeFailure(f"the runtime failed earlier and cannot go on: {self.broken}")
        board = Board(self.timeout_s)
        workers = [
            threading.Thread(
                target=self._worker,
                args=(d, lists[d.index], data, board),
                name=f"tspipe-dev{d.index}",
                daemon=True,
            )
            for d in self.devices
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if board.failure is not None:
            device, task, err = board.failure
            where = "".join(f" ({note})" for note in getattr(err, "_tspipe_notes", []))
            self.broken = RuntimeFailure(
                f"device {device} failed at task {task}{where}: {type(err).__name__}: {err}"
            )
            raise self.broken from err

    def _worker(self, d: _Device, tasks: Sequence[Task], data: dict[int, Any], board: Board) -> None:
        task = tasks[0] if tasks else Task("opt", d.index, -1)
        try:
            with torch.cuda.stream(d.stream) if d.stream is not None else contextlib.nullcontext():
                for task in tasks:
                    getattr(self, f"_{task.kind}")(d, task, data, board)
        except _Aborted:
            return
        except BaseException as e:  # noqa: BLE001 - every failure reaches the caller, named
            board.abort(d.index, task, e)

    # --- messages ---------------------------------------------------------------------------

    def _send(self, d: _Device, board: Board, key: Any, payload: Any) -> None:
        """Post ``payload``; on a GPU with an event marking when the stage's stream made it."""
        event = None
        if d.stream is not None:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(d.stream)
        board.put(key, (payload, event))

    def _receive(self, d: _Device, board: Board, key: Any) -> Any:
        """Take a message; on a GPU, this stage's stream waits for the sender's work first."""
        payload, event = board.take(key)
        if event is not None and d.stream is not None:
            d.stream.wait_event(event)
            for x in tree_flatten(payload)[0]:
                if isinstance(x, torch.Tensor) and x.device == d.device:
                    x.record_stream(d.stream)  # the allocator must not reuse it under our feet
        return payload

    # --- tasks ------------------------------------------------------------------------------

    def _inputs(
        self, d: _Device, cap: CapturedModel, io: Stage, t: Task, data: dict[int, Any], board: Board
    ) -> dict[str, Any]:
        if d.index == 0:
            args, kwargs, _ = data[t.batch]
            flat = cap.flatten_inputs(args[t.view][t.micro], kwargs[t.view][t.micro])
            return {name: _to(x, d.device) for name, x in zip(io.inputs, flat, strict=True)}
        received = self._receive(d, board, (t.kind, d.index - 1, t.batch, t.view, t.micro))
        return {name: received[name] for name in io.inputs}

    def _tf(self, d: _Device, t: Task, data: dict[int, Any], board: Board) -> None:
        received = self._inputs(d, self.teacher_cap, d.t_io, t, data, board)
        values = received if d.index == 0 else {n: _to(v, d.device) for n, (v, _) in received.items()}
        args = [values[n] for n in d.t_io.inputs]
        with torch.no_grad():
            if d.teacher_prev is not None and t.batch == d.stale_batch:
                out = tuple(torch.func.functional_call(d.teacher, d.teacher_prev, tuple(args), strict=False))
            else:
                out = _call_stage(d.teacher, args, f"teacher stage {d.index}")
        if d.index == self.n_stages - 1:
            d.teacher_out[(t.batch, t.view, t.micro)] = out
        else:
            self._send(
                d,
                board,
                ("tf", d.index, t.batch, t.view, t.micro),
                {n: (o, False) for n, o in zip(d.t_io.outputs, out, strict=True)},
            )

    def _sf(self, d: _Device, t: Task, data: dict[int, Any], board: Board) -> None:
        received = self._inputs(d, self.student_cap, d.s_io, t, data, board)
        leaves: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        for name, item in received.items():
            if d.index == 0:
                values[name] = item
                continue
            x, needs_grad = item  # (value, whether it requires grad where it was made)
            x = _to(x, d.device)
            if needs_grad:
                x = leaves[name] = x.detach().requires_grad_()
                if name in self.written[d.index]:
                    with torch.enable_grad():
                        x = x.clone()
            values[name] = x
        with torch.enable_grad():
            out = _call_stage(d.student, [values[n] for n in d.s_io.inputs], f"student stage {d.index}")
        d.saved[(t.batch, t.view, t.micro)] = (leaves, out)
        if d.index == self.n_stages - 1:
            d.student_out[(t.batch, t.view, t.micro)] = out
            return
        sent = {
            name: (o.detach(), o.requires_grad) if isinstance(o, torch.Tensor) else (o, False)
            for name, o in zip(d.s_io.outputs, out, strict=True)
        }
        self._send(d, board, ("sf", d.index, t.batch, t.view, t.micro), sent)

    def _loss(self, d: _Device, t: Task, data: dict[int, Any], board: Board) -> None:
        b = t.batch
        args, _, target = data[b]
        micro = sorted(
            {(v, m) for (bb, v, m) in d.student_out if bb == b and (not self.loss_per_micro or m == t.micro)}
        )
        weight = 1.0
        if self.loss_per_micro:  # a mean over samples: micro-batch m weighs its share of the batch
            sizes = [_batch_size(a) for a in args[0]]
            weight = sizes[t.micro] / sum(sizes)
            target = split_tree(target, len(sizes))[t.micro]
        per_view_s, per_view_t, leaves = [], [], {}
        for v in range(self.views):
            s_parts, t_parts = [], []
            for vv, m in micro:
                if vv != v:
                    continue
                outs = []
                for i, o in enumerate(d.student_out.pop((b, v, m))):
                    if isinstance(o, torch.Tensor) and o.requires_grad:
                        leaf = o.detach().requires_grad_()
                        leaves[(v, m, i)] = leaf
                        o = leaf
                    outs.append(o)
                s_parts.append(outs)
                t_parts.append(list(d.teacher_out.pop((b, v, m))))
            per_view_s.append(self.student_cap.unflatten_outputs(join_micro(s_parts)))
            per_view_t.append(self.teacher_cap.unflatten_outputs(join_micro(t_parts)))
        with torch.enable_grad():
            if self.views == 1:
                loss = self.loss_fn(per_view_s[0], per_view_t[0], _to_tree(target, d.device))
            else:
                loss = self.loss_fn(*per_view_s, *per_view_t)
            loss = loss * weight
            keys = list(leaves)
            grads = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True) if keys else ()
        for (v, m, i), g in zip(keys, grads, strict=True):
            board.put(("grad", b, v, m, i), g)
        for v, m in micro:  # outputs without a gradient still need a message
            for i in range(len(d.s_io.outputs)):
                if (v, m, i) not in leaves:
                    board.put(("grad", b, v, m, i), None)
        value = float(loss.detach())
        self.losses[b] = self.losses.get(b, 0.0) + value
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss of batch {b} is {value}")

    def _sb(self, d: _Device, t: Task, data: dict[int, Any], board: Board) -> None:
        leaves, out = d.saved.pop((t.batch, t.view, t.micro))
        if d.index == self.n_stages - 1:
            grads = [board.take(("grad", t.batch, t.view, t.micro, i)) for i in range(len(out))]
        else:
            received = self._receive(d, board, ("sb", d.index + 1, t.batch, t.view, t.micro))
            grads = [received.get(name) for name in d.s_io.outputs]
        pairs = [
            (o, _to(g, o.device))
            for o, g in zip(out, grads, strict=True)
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if d.index > 0:
            self._send(
                d,
                board,
                ("sb", d.index, t.batch, t.view, t.micro),
                {n: leaf.grad for n, leaf in leaves.items()},
            )

    def _opt(self, d: _Device, t: Task, data: dict[int, Any], board: Board) -> None:
        for names, stages in self.ties:  # the owner sums its copies' gradients
            if d.index in stages:
                self._sum_tied(d, names, stages)
        self._reduce_replicas(d)
        if self.clip is not None:
            # As torch.nn.utils.clip_grad_norm_ computes it on one device: the norm of every
            # parameter's gradient norm, stacked in the model's parameter order.
            owned = {id(q) for q in _params(d.optimizer)}
            grads = {
                n: p.grad for n, p in d.student.named_parameters() if p.grad is not None and id(p) in owned
            }
            norms = self._all_norms(
                d, t.batch, {n: torch.linalg.vector_norm(g).cpu() for n, g in grads.items()}, board
            )
            ordered = [norms[n] for n in self.param_order if n in norms] + [
                v for n, v in norms.items() if n not in self.param_order
            ]
            total = torch.linalg.vector_norm(torch.stack(ordered)) if ordered else torch.tensor(0.0)
            coef = torch.clamp(self.clip / (total + 1e-6), max=1.0)
            for g in grads.values():
                g.mul_(coef.to(g.device))
        if d.optimizer is not None:
            d.optimizer.step()
            if d.scheduler is not None:
                d.scheduler.step()
            d.optimizer.zero_grad(set_to_none=True)
        for names, stages in self.ties:  # ... and hands out the new value
            if d.index in stages:
                self._copy_tied(d, names, stages)
        if self.mode == "momentum":
            student: dict[str, torch.Tensor] = dict(d.student.named_parameters())
            teacher: list[tuple[str, torch.Tensor]] = list(d.teacher.named_parameters())
            if self.ema_buffers:
                student.update(dict(d.student.named_buffers()))
                teacher += list(d.teacher.named_buffers())
            if self.keep_teacher_before_ema:
                d.teacher_prev = {n: x.detach().clone() for n, x in teacher}
            ema_update(teacher, student, self.momentum)

    def _reduce_replicas(self, d: _Device) -> None:
        """Average the student gradients over data-parallel replicas (none here)."""

    def _all_norms(
        self, d: _Device, batch: int, mine: dict[str, torch.Tensor], board: Board
    ) -> dict[str, torch.Tensor]:
        """Every stage's gradient norms (a barrier: the global norm needs every stage)."""
        board.put(("norm", d.index, batch), mine)
        norms: dict[str, torch.Tensor] = {}
        for k in range(self.n_stages):
            norms.update(board.take(("norm", k, batch), keep=True))
        return norms

    # --- weights ---------------------------------------------------------------------------

    def stage_state_dicts(self, which: str) -> list[dict[str, torch.Tensor]]:
        """Every stage's ``state_dict`` of the ``"student"`` or the ``"teacher"``."""
        return [
            (d.student if which == "student" else d.teacher).state_dict(keep_vars=True) for d in self.devices
        ]

    def barrier(self) -> None:
        """Wait for every process of the run (one process here)."""

    def drain(self) -> None:
        """Wait until every message sent has left (they are in memory here)."""

    # --- tied tensors -----------------------------------------------------------------------

    def _sum_tied(self, d: _Device, names: tuple[str, ...], stages: tuple[int, ...]) -> None:
        """At the owner (the group's first stage): add the copies' gradients to its own."""
        if d.index != stages[0]:
            return
        mine = _param(d.student, names)
        for k in stages[1:]:
            other = _param(self.stage[k].student, names)
            if other.grad is not None:
                mine.grad = (
                    other.grad.to(mine.device)
                    if mine.grad is None
                    else mine.grad + other.grad.to(mine.device)
                )
                other.grad = None

    def _copy_tied(self, d: _Device, names: tuple[str, ...], stages: tuple[int, ...]) -> None:
        """At the owner, after its step: write the new value into every copy."""
        if d.index != stages[0]:
            return
        mine = _param(d.student, names)
        with torch.no_grad():
            for k in stages[1:]:
                _param(self.stage[k].student, names).copy_(mine)


def _call_stage(module: fx.GraphModule, args: Sequence[Any], label: str) -> tuple[Any, ...]:
    """Run a stage; if it fails, replay it node by node to name the node that failed."""
    try:
        return tuple(module(*args))
    except Exception as e:
        with torch.no_grad():
            try:
                fx.Interpreter(module).run(*args)
            except Exception as again:  # noqa: BLE001 - only where it stopped is wanted
                text = "\n".join([str(again), *getattr(again, "__notes__", [])])
                found = re.search(r"While executing %(\S+)", text)
                if found:
                    setattr(e, "_tspipe_notes", [f"{label}, node {found.group(1)}"])  # noqa: B010
        raise


# Ops whose output shares its input's memory: an in-place op on the result writes the input.
_ALIAS_METHODS = {
    "view", "view_as", "reshape", "flatten", "unflatten", "transpose", "permute", "t", "expand",
    "expand_as", "squeeze", "unsqueeze", "narrow", "select", "unbind", "split", "chunk", "detach",
    "__getitem__", "contiguous", "as_strided", "movedim", "swapaxes", "diagonal", "unfold",
}  # fmt: skip
_ALIAS_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
    torch.unsqueeze, torch.narrow, torch.select, torch.unbind, torch.split, torch.chunk, torch.t,
    torch.movedim, torch.swapaxes, torch.diagonal, torch.detach,
}  # fmt: skip


def _aliases(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node``'s output may share memory with its first argument."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Identity)
    if node.op == "call_method":
        return str(node.target) in _ALIAS_METHODS
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):  # export's aten ops: their schemas say it
            returns = target._schema.returns
            return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        return target in _ALIAS_FUNCTIONS or getattr(target, "__name__", "") in _ALIAS_METHODS
    return False


def _written_inputs(gm: fx.GraphModule) -> set[str]:
    """Stage inputs an in-place op writes to, directly or through identities and views."""
    written = set()
    for p in gm.graph.nodes:
        if p.op != "placeholder":
            continue
        reach, todo = {p}, [p]
        while todo:
            for u in todo.pop().users:
                if u.args and u.args[0] in reach and u not in reach:
                    if may_mutate(u, gm):
                        written.add(str(p.target))
                    if _aliases(u, gm):
                        reach.add(u)
                        todo.append(u)
    return written


def _params(opt: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]] if opt is not None else []


def _param(module: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    for n in names:
        try:
            return module.get_parameter(n)
        except AttributeError:
            continue
    raise TspipeError(f"tied parameter {names} not found in {module.__class__.__name__}")


def _batch_size(args: tuple[Any, ...]) -> int:
    leaves = [x for x in tree_flatten(args)[0] if isinstance(x, torch.Tensor) and x.dim() > 0]
    return int(leaves[0].shape[0]) if leaves else 1


def _to_tree(value: Any, device: torch.device) -> Any:
    leaves, spec = tree_flatten(value)
    return tree_unflatten([_to(x, device) for x in leaves], spec)
