"""The distributed runtime: one rank per device under torchrun, pipeline x data parallel.

``pipe.trainer(..., runtime="dist")`` in a script started by ``torchrun --nproc-per-node N
[--nnodes K --rdzv-backend c10d --rdzv-endpoint HOST:PORT]``. Ranks form ``world / N``
pipelines of ``N`` consecutive ranks (the plan's devices): rank ``r`` is device ``r % N`` of
pipeline ``r // N`` and runs its stage (with virtual stages, its stages ``r % N + k N``). Every
rank of a pipeline calls ``trainer.step`` with the same batch (the first stage reads the inputs,
the last the target); each pipeline gets its own share of the data, as with
DistributedDataParallel.

Rank ``r`` executes the task list of its device, the very list the local runtime gives a thread,
through the same task code (:class:`~tspipe_fx.runtime.tasks.StageTasks`), each task on its own
stage's state; only the messages, collectives and failures differ:

- Activations and gradients move with batched ``isend``/``irecv`` on one process group per
  neighbour pair and direction. Their shapes and dtypes are known without asking: each rank
  runs the stage modules on fake tensors for the batch's shapes (cached per shape), and a
  gradient has the shape of the output it belongs to. On a channel the receiver posts its
  receives in the sender's task order (every rank knows every stage's task list), so messages
  match on NCCL, which pairs them by order alone, as on gloo.
- A rank runs its list in order, but where the next task waits for a message, a later teacher
  forward or weight-gradient half that changes no result by going first runs meanwhile
  (:mod:`tspipe_fx.schedule.lookahead`): a neighbour late against the plan costs less idling.
- The loss is computed on the last stage and all-reduced to every rank (averaged over
  pipelines). Student gradients are averaged over the pipelines before the optimizer step, so
  replicas and their EMA teachers stay equal; gradient clipping all-reduces the per-parameter
  norms of the pipeline; tied weights travel between their stages point to point.
- A failing rank posts its error to the rendezvous store; a watchdog thread on every rank
  reads it, and heartbeats, and ends its process with a message naming the failed rank (or the
  rank that stopped answering) instead of leaving it blocked in a receive.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.batches import Fed
from tspipe_fx.runtime.board import Board
from tspipe_fx.runtime.channels import inbound
from tspipe_fx.runtime.device import NOTES_ATTR, DeviceState, parameter_of
from tspipe_fx.runtime.dist.collectives import by_dtype, flatten, unflatten
from tspipe_fx.runtime.dist.layout import Layout
from tspipe_fx.runtime.dist.messages import Messages
from tspipe_fx.runtime.dist.watchdog import PeerLost, Watchdog
from tspipe_fx.runtime.tasks import RuntimeFailure, StageTasks
from tspipe_fx.runtime.optim import optimizer_params
from tspipe_fx.schedule.lookahead import HORIZON, next_task
from tspipe_fx.schedule.task import Task
from tspipe_fx.stage import StagedModel

__all__ = ["DistRuntime"]

_FWD = ("tf", "sf")


class DistRuntime(StageTasks):
    """The local runtime's task code with one device per rank; see the module docstring."""

    horizon = HORIZON  # later tasks looked at while the next one waits (0: the list's order)

    def __init__(
        self,
        student: StagedModel,
        teacher: StagedModel,
        layout: Layout,
        device: torch.device,
        loss_fn: Callable[..., torch.Tensor],
        **options: Any,
    ):
        self.layout = layout
        self.early = 0  # tasks run ahead of their turn while the next one waited for a message
        n, devices = layout.n_stages, layout.n_devices
        super().__init__(student, teacher, [device] * n, loss_fn, held=layout.stages, **options)
        self.comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        # Every group is created by every rank, in one order.
        channels: dict[tuple[int, int, int], Any] = {}  # (pipeline, from stage, to stage) -> group
        pipeline_groups, replica_groups = [], []
        tie_groups: list[dict[tuple[str, ...], Any]] = []
        for p in range(layout.pipelines):
            for j in range(n - 1):
                a, b = layout.rank_of(j, p), layout.rank_of(j + 1, p)
                channels[(p, j, j + 1)] = dist.new_group([a, b])
                channels[(p, j + 1, j)] = dist.new_group([a, b])
            pipeline_groups.append(dist.new_group([layout.rank_of(k, p) for k in range(devices)]))
            tie_groups.append(
                {names: dist.new_group(sorted({layout.rank_of(j, p) for j in ks})) for names, ks in self.ties}
            )
        for k in range(devices):
            replica_groups.append(dist.new_group([layout.rank_of(k, p) for p in range(layout.pipelines)]))
        self.pipeline_group: Any = pipeline_groups[layout.pipeline]
        self.replica_group: Any = replica_groups[layout.device]
        self.tie_groups = tie_groups[layout.pipeline]  # (a tie's messages in their own order)
        # Which stage owns each trainable student parameter, in the model's order (clipping).
        owners: dict[str, int] = {}
        for j, st in enumerate(self.student.stages):
            for name in self.owned_parameters(j, st.module):
                owners.setdefault(name, j)
        self.norm_names = [n for n in self.param_order if n in owners] + [
            n for n in owners if n not in self.param_order
        ]
        self.messages = Messages(
            layout, channels, student, teacher, self.timeout_s, (self.precision, self.teacher_precision)
        )
        self.watchdog = Watchdog(layout) if "MASTER_ADDR" in os.environ else None

    # --- a window ------------------------------------------------------------------------------

    def run(self, lists: Sequence[Sequence[Task]], data: dict[int, Fed]) -> None:
        if self.broken is not None:
            raise RuntimeFailure(f"the runtime failed earlier and cannot go on: {self.broken}")
        tasks = lists[self.layout.device]
        board = Board(self.timeout_s)
        self.messages.start_window(lists, data)
        task = tasks[0] if tasks else Task("opt", self.layout.device, -1)
        batch = next(t.batch for t in tasks if t.kind == "opt")
        try:
            inbox = self._expect_losses()
            losses = sum(t.kind == "loss" for t in tasks)
            pending = list(tasks)
            while pending:  # in order, but a task that may go first runs while the next one waits
                k = next_task(pending, self._arrived, self.horizon)
                task = pending.pop(k)
                self.run_task(self.stage[task.stage], task, data, board)
                self.early += k > 0
                losses -= task.kind == "loss"
                if task.kind == "loss" and not losses:
                    self._tell_loss(batch)
            self.messages.check_used()
            values = []
            for p in range(self.layout.pipelines):
                sender = self.layout.rank_of(self.n_stages - 1, p)
                if sender in inbox:
                    work, value = inbox[sender]
                    self.messages.wait(work, f"receiving the loss of batch {batch}", sender)
                    values.append(float(value))
                else:
                    values.append(self.losses[batch])
            # Sends complete in their own time: no barrier between windows, so the next one's
            # work starts while the peers finish this one.
            self.messages.settle()
        except Exception as e:
            where = "".join(f" ({note})" for note in getattr(e, NOTES_ATTR, []))
            message = f"task {task}{where}: {type(e).__name__}: {e}"
            notice = self.watchdog.notice() if self.watchdog is not None else None
            if notice is not None:  # a peer failed first; this is the echo (a closed connection)
                assert self.watchdog is not None
                self.watchdog.echo(notice)
                self.broken = RuntimeFailure(f"rank {self.layout.rank} stops: {notice}")
            elif isinstance(e, PeerLost):  # the peer went without a word: name it, not this rank
                if self.watchdog is not None:
                    self.watchdog.lost(e)
                self.broken = RuntimeFailure(f"rank {self.layout.rank} ({self._where}) stops: {e}")
            else:
                if self.watchdog is not None:
                    self.watchdog.fail(message)
                self.broken = RuntimeFailure(f"rank {self.layout.rank} ({self._where}) failed at {message}")
            raise self.broken from e
        self.losses[batch] = sum(values) / len(values)  # the mean over pipelines

    def _arrived(self, task: Task) -> bool:
        """Whether the message ``task`` starts from (if any) is in."""
        key = inbound(task, self.n_stages)
        return key is None or self.messages.arrived(self.stage[task.stage], key)

    @property
    def _where(self) -> str:
        return self.layout.where(self.layout.rank)

    def recover(self) -> bool:
        """A failed window is not undone across ranks: the run stops (torchrun names the rank)."""
        return self.broken is None

    def _expect_losses(self) -> dict[int, tuple[Any, torch.Tensor]]:
        """Post the receives of this window's loss from every pipeline's last rank."""
        me = self.layout.rank
        inbox = {}
        for p in range(self.layout.pipelines):
            sender = self.layout.rank_of(self.n_stages - 1, p)
            if sender != me:
                value = torch.zeros(1, dtype=torch.float64, device=self.comm)
                (work,) = dist.batch_isend_irecv([dist.P2POp(dist.irecv, value, sender)])
                inbox[sender] = (work, value)
        return inbox

    def _tell_loss(self, batch: int) -> None:
        """The last stage, once its batch's loss is whole: to every other rank, at once."""
        value = torch.tensor([self.losses[batch]], dtype=torch.float64, device=self.comm)
        peers = [r for r in range(self.layout.world) if r != self.layout.rank]
        if peers:
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, value, r) for r in peers])
            for w, r in zip(works, peers, strict=True):
                self.messages.track(w, [value], r)

    def drain(self) -> None:
        """Wait until every message this rank sent has left."""
        self.messages.drain()

    # --- messages ------------------------------------------------------------------------------

    def send(self, d: DeviceState, board: Board, key: Any, payload: Any) -> None:
        self.messages.send(d, key, payload)

    def receive(self, d: DeviceState, board: Board, key: Any) -> Any:
        return self.messages.receive(d, key)

    # --- collectives ---------------------------------------------------------------------------

    def reduce_replicas(self, d: DeviceState) -> None:
        """Average the student gradients over the pipelines; their buffers (BatchNorm statistics)
        become pipeline 0's, as DistributedDataParallel's ``broadcast_buffers`` does."""
        if self.layout.pipelines == 1:
            return
        grads = [p.grad for p in optimizer_params(d.optimizer) if p.grad is not None]
        for same in by_dtype(grads):
            flat = flatten(same).to(self.comm)
            dist.all_reduce(flat, group=self.replica_group)
            flat /= self.layout.pipelines
            for g, r in zip(same, unflatten(flat.to(same[0].device), same), strict=True):
                g.copy_(r)
        for same in by_dtype([b for b in d.student.buffers()]):
            flat = flatten(same).to(self.comm)
            dist.broadcast(flat, src=self.layout.rank_of(d.index, 0), group=self.replica_group)
            with torch.no_grad():
                for b, r in zip(same, unflatten(flat.to(same[0].device), same), strict=True):
                    b.copy_(r)

    def all_norms(
        self, d: DeviceState, batch: int, mine: dict[str, torch.Tensor], board: Board
    ) -> dict[str, torch.Tensor]:
        dtype = next(iter(mine.values())).dtype if mine else torch.float32
        vec = torch.zeros(len(self.norm_names), dtype=dtype)
        index = {n: i for i, n in enumerate(self.norm_names)}
        for n, v in mine.items():
            vec[index[n]] = v
        vec = vec.to(self.comm)
        dist.all_reduce(vec, group=self.pipeline_group)  # x + 0 + 0: every stage's norms, exactly
        vec = vec.cpu()
        return {n: vec[i] for i, n in enumerate(self.norm_names)}

    def sum_tied(self, d: DeviceState, names: tuple[str, ...], stages: tuple[int, ...], board: Board) -> None:
        mine = parameter_of(d.student, names)
        if d.index != stages[0]:
            grad = mine.grad if mine.grad is not None else torch.zeros_like(mine)
            self._p2p(dist.isend, grad.detach().contiguous(), stages[0], names, wait=False)
            mine.grad = None
            return
        for k in stages[1:]:
            other = torch.empty_like(mine)
            self._p2p(dist.irecv, other, k, names, wait=True)
            mine.grad = other if mine.grad is None else mine.grad + other

    def copy_tied(self, d: DeviceState, names: tuple[str, ...], stages: tuple[int, ...], board: Board) -> None:
        mine = parameter_of(d.student, names)
        if d.index == stages[0]:
            for k in stages[1:]:
                self._p2p(dist.isend, mine.detach().clone(), k, names, wait=False)
            return
        value = torch.empty_like(mine)
        self._p2p(dist.irecv, value, stages[0], names, wait=True)
        with torch.no_grad():
            mine.copy_(value)

    def _p2p(
        self, op: Callable[..., Any], tensor: torch.Tensor, stage: int, tie: tuple[str, ...], *, wait: bool
    ) -> None:
        (work,) = dist.batch_isend_irecv([dist.P2POp(op, tensor, self.layout.rank_of(stage), self.tie_groups[tie])])
        if wait:
            self.messages.wait(work, "exchanging a tied weight", self.layout.rank_of(stage))
        else:
            self.messages.track(work, [tensor], self.layout.rank_of(stage))

    # --- weights of every stage ---------------------------------------------------------------

    def stage_state_dicts(self, which: str) -> list[dict[str, torch.Tensor]]:
        """Every stage's state_dict on every rank (pipeline 0's, broadcast), on the CPU."""
        self.drain()
        out = []
        for j in range(self.n_stages):
            src = self.layout.rank_of(j, 0)
            if self.layout.rank == src:
                d = self.stage[j]
                state = (d.student if which == "student" else d.teacher).state_dict()
            else:
                template = (self.student if which == "student" else self.teacher).stages[j].module.state_dict()
                state = {n: torch.empty_like(v, device=self.comm) for n, v in template.items()}
            names = list(state)
            for dtype in sorted({state[n].dtype for n in names}, key=str):
                keys = [n for n in names if state[n].dtype == dtype]
                flat = flatten([state[n].detach().to(self.comm) for n in keys])
                dist.broadcast(flat, src=src)
                for n, v in zip(keys, unflatten(flat, [state[n] for n in keys]), strict=True):
                    state[n] = v.cpu()
            out.append({n: state[n].cpu() for n in names})
        return out

    def barrier(self) -> None:
        self.drain()
        dist.barrier()
