"""The distributed runtime: one rank per device under torchrun, pipeline x data parallel.

``pipe.trainer(..., runtime="dist")`` in a script started by ``torchrun --nproc-per-node N
[--nnodes K --rdzv-backend c10d --rdzv-endpoint HOST:PORT]``. Ranks form ``world / n_stages``
pipelines of consecutive ranks: rank ``r`` runs stage ``r % n_stages`` of pipeline
``r // n_stages``. Every rank of a pipeline calls ``trainer.step`` with the same batch (the
first stage reads the inputs, the last the target); each pipeline gets its own share of the
data, as with DistributedDataParallel.

Rank ``r`` executes the task list of its stage, the very list the local runtime gives a thread,
through the same task code (:class:`~tspipe_fx.runtime.LocalRuntime`); only the messages,
collectives and failures differ:

- Activations and gradients move with batched ``isend``/``irecv`` on one process group per
  neighbour pair and direction. Their shapes and dtypes are known without asking: each rank
  runs the stage modules on fake tensors for the batch's shapes (cached per shape), and a
  gradient has the shape of the output it belongs to. On a channel the receiver posts its
  receives in the sender's task order (every rank knows every stage's task list), so messages
  match on NCCL, which pairs them by order alone, as on gloo.
- The loss is computed on the last stage and all-reduced to every rank (averaged over
  pipelines). Student gradients are averaged over the pipelines before the optimizer step, so
  replicas and their EMA teachers stay equal; gradient clipping all-reduces the per-parameter
  norms of the pipeline; tied weights travel between their stages point to point.
- A failing rank posts its error to the rendezvous store; a watchdog thread on every rank
  reads it, and heartbeats, and ends its process with a message naming the failed rank (or the
  rank that stopped answering) instead of leaving it blocked in a receive.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore
from torch._subclasses.fake_tensor import FakeTensorMode

from tspipe_fx.errors import TspipeError
from tspipe_fx.plan import Plan
from tspipe_fx.runtime import Board, LocalRuntime, RuntimeFailure, _Device, _param, _params, _written_inputs
from tspipe_fx.schedule import Task
from tspipe_fx.split import Stage

__all__ = ["DistRuntime", "Layout", "PeerLost", "agree_on_plan", "init"]

_FWD = ("tf", "sf")


class PeerLost(TspipeError):
    """Another rank went away while this one exchanged messages with it."""


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: ``pipelines`` replicas of ``n_stages`` consecutive ranks."""

    rank: int
    world: int
    n_stages: int

    @property
    def pipelines(self) -> int:
        return self.world // self.n_stages

    @property
    def pipeline(self) -> int:
        return self.rank // self.n_stages

    @property
    def stage(self) -> int:
        return self.rank % self.n_stages

    def rank_of(self, stage: int, pipeline: int | None = None) -> int:
        return (self.pipeline if pipeline is None else pipeline) * self.n_stages + stage


def init(n_stages: int) -> tuple[Layout, torch.device]:
    """Join (or reuse) the process group from torchrun's environment; this rank's device.

    NCCL with ``cuda:LOCAL_RANK`` where CUDA is available, gloo on the CPU otherwise.
    """
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise TspipeError(
                f"runtime='dist' needs a process group, and the environment lacks {missing}; hint: "
                "start the script with torchrun --nproc-per-node N script.py (or call "
                "torch.distributed.init_process_group first)"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        atexit.register(_destroy)  # ours to end; runs after the watchdog's goodbye (LIFO)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % n_stages:
        raise TspipeError(
            f"the world has {world} ranks, not a multiple of the pipeline's {n_stages} stages; hint: "
            f"launch n_stages x replicas ranks (torchrun --nproc-per-node {n_stages})"
        )
    if dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Layout(rank, world, n_stages), device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def agree_on_plan(pipe: Any) -> Any:
    """Rank 0's plan for every rank: a plan from measured costs may differ from rank to rank."""
    box = [pipe.plan.to_json() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    plan = Plan.from_json(str(box[0]))
    if (plan.student.cuts, plan.teacher.cuts) == (pipe.plan.student.cuts, pipe.plan.teacher.cuts):
        return pipe
    return pipe.with_plan(plan)


# --- shapes of the messages -------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def _signature(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(
        (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", repr(v)) for v in values
    )


def boundary_specs(stages: Sequence[Stage], inputs: Sequence[Any], *, grad: bool) -> list[dict[str, Any]]:
    """Each stage's outputs for these model inputs, from a run on fake tensors: a :class:`_Spec`
    per tensor, the value itself for anything else (sizes, flags). Nothing real is touched."""
    out: list[dict[str, Any]] = []
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        env: dict[str, Any] = {
            n: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
            for n, x in zip(stages[0].inputs, inputs, strict=True)
        }
        for j, st in enumerate(stages):
            written = _written_inputs(st.module)
            args = []
            for n in st.inputs:
                v = env[n]
                if j > 0 and isinstance(v, torch.Tensor) and v.requires_grad:
                    v = v.detach().requires_grad_()
                    if n in written:  # as the runtime does: autograd forbids writing to a leaf
                        v = v.clone()
                args.append(v)
            with torch.set_grad_enabled(grad):
                values = tuple(st.module(*args))
            specs = {
                n: _Spec(tuple(int(s) for s in v.shape), v.dtype, bool(v.requires_grad))
                if isinstance(v, torch.Tensor)
                else v
                for n, v in zip(st.outputs, values, strict=True)
            }
            out.append(specs)
            env.update(zip(st.outputs, values, strict=True))
    return out


# --- failures across ranks --------------------------------------------------------------------


class Watchdog:
    """Heartbeats and failure notices through the rendezvous store, on a daemon thread.

    A rank that fails posts ``rank R (stage S) failed: ...``; every other rank, blocked or not,
    sees it within ``poll_s`` and ends its process with exit code 1 and that message. A rank
    whose heartbeat stops for ``dead_after_s`` (killed, or its machine gone) is reported as such.
    A rank that ends normally says so first, and is no longer watched.
    """

    def __init__(self, layout: Layout, *, poll_s: float = 0.5, dead_after_s: float = 20.0):
        self.layout, self.poll_s, self.dead_after_s = layout, poll_s, dead_after_s
        prefix = f"tspipe_fx/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self._main = PrefixStore(prefix, TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60)))
        # The thread has its own connection: a store client is not shared across threads.
        self._own = PrefixStore(prefix, TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tspipe-watchdog", daemon=True)
        self._thread.start()
        self._previous_hook = sys.excepthook
        sys.excepthook = self._excepthook
        atexit.register(self.close)

    def fail(self, message: str, *, wait_s: float = 5.0) -> None:
        """Tell every rank that this one failed (the first notice wins), and give them up to
        ``wait_s`` to read it before this process goes on to exit (torchrun ends the others
        when it sees one exit, which could otherwise cut their own word short)."""
        try:
            self._main.compare_set(
                "failed", "", f"rank {self.layout.rank} (stage {self.layout.stage}) failed: {message}"
            )
            deadline = time.monotonic() + wait_s
            while self._main.add("read", 0) < self.layout.world - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store may be gone with the failure; the heartbeat tells then
            pass

    def notice(self) -> str | None:
        """The failure another rank posted, if any (waits a moment: it may be on its way)."""
        for _ in range(int(2 / self.poll_s) + 1):
            try:
                if self._main.check(["failed"]):
                    text = self._main.get("failed").decode()
                    return None if text.startswith(f"rank {self.layout.rank} ") else text
            except Exception:  # noqa: BLE001 - no store, no notice
                return None
            time.sleep(self.poll_s)
        return None

    def close(self) -> None:
        """This rank ends normally: stop watching and say so."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._main.set(f"done/{self.layout.rank}", "1")
        except Exception:  # noqa: BLE001 - at exit, nothing left to tell
            pass
        self._thread.join(timeout=5 * self.poll_s + 5)

    def _excepthook(self, kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(value, RuntimeFailure):  # a runtime failure was posted where it happened
            self.fail(f"{kind.__name__}: {value}")
        self._previous_hook(kind, value, tb)

    def _watch(self) -> None:
        me = self.layout.rank
        others = [r for r in range(self.layout.world) if r != me]
        seen = {r: (-1, time.monotonic()) for r in others}
        while not self._stop.wait(self.poll_s):
            try:
                self._own.add(f"beat/{me}", 1)
                if self._own.check(["failed"]):
                    notice = self._own.get("failed").decode()
                    if notice.startswith(f"rank {me} "):
                        return  # this rank's own failure: its main thread reports and exits
                    self._end(notice)
                now = time.monotonic()
                for r in others:
                    if self._own.check([f"done/{r}"]):
                        continue
                    beat = self._own.add(f"beat/{r}", 0)
                    if beat != seen[r][0]:
                        seen[r] = (beat, now)
                    elif now - seen[r][1] > self.dead_after_s:
                        self._own.compare_set(
                            "failed",
                            "",
                            f"rank {r} stopped answering for {self.dead_after_s:.0f} s (killed, or its machine is gone)",
                        )
            except Exception as e:  # noqa: BLE001 - the store lives with torchrun's agent; it went away
                if self._stop.is_set():
                    return
                self._end(
                    f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} went away ({e})"
                )

    def _end(self, why: str) -> None:
        if self._stop.is_set():
            return
        print(f"tspipe_fx: rank {self.layout.rank} stops: {why}", file=sys.stderr, flush=True)
        try:
            self._own.add("read", 1)  # the failed rank waits for this before it exits
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
        os._exit(1)


# --- the runtime -------------------------------------------------------------------------------


class DistRuntime(LocalRuntime):
    """The local runtime's task code with one stage per rank; see the module docstring."""

    def __init__(self, pipe: Any, layout: Layout, device: torch.device, **options: Any):
        self.layout = layout
        n = layout.n_stages
        super().__init__(
            pipe.student_io, pipe.teacher_io, pipe.student, pipe.teacher, [device] * n,
            held=[layout.stage], **options,
        )  # fmt: skip
        self.student_io, self.teacher_io = list(pipe.student_io), list(pipe.teacher_io)
        self.comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        # Every group is created by every rank, in one order.
        self.channels: dict[tuple[int, int, int], Any] = {}  # (pipeline, from, to) -> group
        pipeline_groups, replica_groups = [], []
        for p in range(layout.pipelines):
            for j in range(n - 1):
                a, b = layout.rank_of(j, p), layout.rank_of(j + 1, p)
                self.channels[(p, j, j + 1)] = dist.new_group([a, b])
                self.channels[(p, j + 1, j)] = dist.new_group([a, b])
            pipeline_groups.append(dist.new_group([layout.rank_of(j, p) for j in range(n)]))
        for j in range(n):
            replica_groups.append(dist.new_group([layout.rank_of(j, p) for p in range(layout.pipelines)]))
        self.pipeline_group: Any = pipeline_groups[layout.pipeline]
        self.replica_group: Any = replica_groups[layout.stage]
        # Which stage owns each trainable student parameter, in the model's order (clipping).
        owners: dict[str, int] = {}
        for j, st in enumerate(self.student_io):
            for name in self.owned_parameters(j, st.module):
                owners.setdefault(name, j)
        self.norm_names = [n for n in self.param_order if n in owners] + [
            n for n in owners if n not in self.param_order
        ]
        self.specs: dict[tuple[str, Any], list[dict[str, Any]]] = {}
        self.watchdog = Watchdog(layout) if "MASTER_ADDR" in os.environ else None
        self._sends: list[tuple[Any, list[torch.Tensor], int]] = []  # work, its tensors, peer rank

    # --- a window ------------------------------------------------------------------------------

    def run(self, lists: Sequence[Sequence[Task]], data: dict[int, tuple[list[Any], list[Any], Any]]) -> None:
        if self.broken is not None:
            raise RuntimeFailure(f"the runtime failed earlier and cannot go on: {self.broken}")
        d = self.devices[0]
        tasks = lists[d.index]
        board = Board(self.timeout_s)
        self._lists, self._data = lists, data
        self._posted: dict[Any, tuple[list[Any], dict[str, Any]]] = {}
        self._cursor: dict[tuple[int, str], int] = {}
        self._window_specs: dict[tuple[str, int, int, int], list[dict[str, Any]]] = {}
        task = tasks[0] if tasks else Task("opt", d.index, -1)
        batch = next(t.batch for t in tasks if t.kind == "opt")
        try:
            inbox = self._expect_losses()
            last_loss = max((i for i, t in enumerate(tasks) if t.kind == "loss"), default=-1)
            for i, task in enumerate(tasks):
                getattr(self, f"_{task.kind}")(d, task, data, board)
                if i == last_loss:
                    self._tell_loss(batch)
            if self._posted:
                raise TspipeError(
                    f"messages {sorted(self._posted)} were received but not used (a schedule bug)"
                )
            values = []
            for p in range(self.layout.pipelines):
                sender = self.layout.rank_of(self.n_stages - 1, p)
                if sender in inbox:
                    work, value = inbox[sender]
                    self._wait(work, f"receiving the loss of batch {batch}", sender)
                    values.append(float(value))
                else:
                    values.append(self.losses[batch])
            # Sends complete in their own time: no barrier between windows, so the next one's
            # work starts while the peers finish this one.
            self._sends = [s for s in self._sends if not s[0].is_completed()]
        except Exception as e:
            where = "".join(f" ({note})" for note in getattr(e, "_tspipe_notes", []))
            message = f"task {task}{where}: {type(e).__name__}: {e}"
            notice = self.watchdog.notice() if self.watchdog is not None else None
            if notice is not None:  # a peer failed first; this is the echo (a closed connection)
                self.broken = RuntimeFailure(f"rank {self.layout.rank} stops: {notice}")
            else:
                if self.watchdog is not None:
                    self.watchdog.fail(message)
                self.broken = RuntimeFailure(f"rank {self.layout.rank} (stage {d.index}) failed at {message}")
            raise self.broken from e
        self.losses[batch] = sum(values) / len(values)  # the mean over pipelines

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
            self._sends.extend((w, [value], r) for w, r in zip(works, peers, strict=True))

    def drain(self) -> None:
        """Wait until every message this rank sent has left."""
        for work, _, peer in self._sends:
            self._wait(work, "sending", peer)
        self._sends.clear()

    # --- messages ------------------------------------------------------------------------------

    def _send(self, d: _Device, board: Board, key: Any, payload: Any) -> None:
        kind, j = key[0], key[1]
        to = j + 1 if kind in _FWD else j - 1
        if kind in _FWD:
            specs = self._specs_of(kind, j, key[2], key[3], key[4])
            tensors = []
            for name, (value, _) in payload.items():
                spec = specs[name]
                if isinstance(spec, _Spec):
                    if tuple(value.shape) != spec.shape or value.dtype != spec.dtype:
                        raise TspipeError(
                            f"{'teacher' if kind == 'tf' else 'student'} stage {j} output {name} is "
                            f"{tuple(value.shape)} {value.dtype}, where the fake run of the plan gave "
                            f"{spec.shape} {spec.dtype}; hint: a stage whose output shapes depend on "
                            "the data cannot be pipelined across processes"
                        )
                    tensors.append(value)
        else:  # a leaf autograd gave no gradient still sends one: the receiver expects it
            specs = self._specs_of("sf", j - 1, key[2], key[3], key[4])
            tensors = [
                payload[n]
                if payload[n] is not None
                else torch.zeros(specs[n].shape, dtype=specs[n].dtype, device=d.device)
                for n in self._grad_names(j, key)
            ]
        self._isend(tensors, to)

    def _isend(self, tensors: list[torch.Tensor], to: int) -> None:
        group = self.channels[(self.layout.pipeline, self.layout.stage, to)]
        peer = self.layout.rank_of(to)
        sent = [t.detach().contiguous() for t in tensors if t.numel()]
        if sent:
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, peer, group) for t in sent])
            self._sends.extend((w, sent, peer) for w in works)

    def _receive(self, d: _Device, board: Board, key: Any) -> Any:
        kind, j = key[0], key[1]
        channel = "fwd" if kind in _FWD else "bwd"
        # Post this channel's receives in the sender's order, up to and including ``key``.
        kinds = _FWD if channel == "fwd" else ("sb",)
        order = [(t.kind, j, t.batch, t.view, t.micro) for t in self._lists[j] if t.kind in kinds]
        at = self._cursor.get((j, channel), 0)
        while key not in self._posted:
            if at >= len(order):
                raise TspipeError(f"stage {j} sends no message {key} in this window (a schedule bug)")
            self._post(d, order[at])
            at += 1
        self._cursor[(j, channel)] = at
        works, payload = self._posted.pop(key)
        for w in works:
            self._wait(w, f"receiving {key}", self.layout.rank_of(j))
        return payload

    def _wait(self, work: Any, what: str, peer: int) -> None:
        """Wait for a point-to-point message; a lost peer is named, not left as a socket error."""
        stage = peer % self.n_stages
        try:
            done = work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise PeerLost(
                f"lost rank {peer} (stage {stage}) while {what}: {str(e).splitlines()[0]}; hint: that "
                "rank died (killed, out of memory?) or hangs; its own log says which"
            ) from e
        if done is False:
            raise TimeoutError(f"waited {self.timeout_s:.0f} s {what} from rank {peer} (stage {stage})")

    def _post(self, d: _Device, key: Any) -> None:
        kind, j = key[0], key[1]
        if kind in _FWD:
            specs = self._specs_of(kind, j, key[2], key[3], key[4])
            payload: dict[str, Any] = {}
            buffers = []
            for name, spec in specs.items():
                if isinstance(spec, _Spec):
                    x = torch.empty(spec.shape, dtype=spec.dtype, device=d.device)
                    payload[name] = (x, spec.requires_grad and kind == "sf")
                    buffers.append(x)
                else:
                    payload[name] = (spec, False)
        else:  # the gradients of this stage's outputs that stage j took as leaves
            specs = self._specs_of("sf", d.index, key[2], key[3], key[4])
            names = self._grad_names(j, key)
            buffers = [torch.empty(specs[n].shape, dtype=specs[n].dtype, device=d.device) for n in names]
            payload = dict(zip(names, buffers, strict=True))
        group = self.channels[(self.layout.pipeline, j, d.index)]
        peer = self.layout.rank_of(j)
        live = [b for b in buffers if b.numel()]
        works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, b, peer, group) for b in live]) if live else []
        self._posted[key] = (works, payload)

    def _grad_names(self, j: int, key: Any) -> list[str]:
        """Stage ``j``'s student inputs that take a gradient, in its input order."""
        specs = self._specs_of("sf", j - 1, key[2], key[3], key[4])
        return [
            n for n in self.student_io[j].inputs if isinstance(specs[n], _Spec) and specs[n].requires_grad
        ]

    def _specs_of(self, kind: str, j: int, batch: int, view: int, micro: int) -> dict[str, Any]:
        """The outputs of stage ``j`` of the student (``sf``) or teacher (``tf``) for a micro-batch."""
        key = (kind, batch, view, micro)
        if key not in self._window_specs:  # flattening the inputs costs ms: once per micro-batch
            student = kind == "sf"
            cap = self.student_cap if student else self.teacher_cap
            args, kwargs, _ = self._data[batch]
            flat = cap.flatten_inputs(args[view][micro], kwargs[view][micro])
            sig = (kind, _signature(flat))
            if sig not in self.specs:
                self.specs[sig] = boundary_specs(
                    self.student_io if student else self.teacher_io, flat, grad=student
                )
            self._window_specs[key] = self.specs[sig]
        return self._window_specs[key][j]

    # --- collectives ---------------------------------------------------------------------------

    def _reduce_replicas(self, d: _Device) -> None:
        """Average the student gradients over the pipelines; their buffers (BatchNorm statistics)
        become pipeline 0's, as DistributedDataParallel's ``broadcast_buffers`` does."""
        if self.layout.pipelines == 1:
            return
        grads = [p.grad for p in _params(d.optimizer) if p.grad is not None]
        for same in _by_dtype(grads):
            flat = _flatten(same).to(self.comm)
            dist.all_reduce(flat, group=self.replica_group)
            flat /= self.layout.pipelines
            for g, r in zip(same, _unflatten(flat.to(same[0].device), same), strict=True):
                g.copy_(r)
        for same in _by_dtype([b for b in d.student.buffers()]):
            flat = _flatten(same).to(self.comm)
            dist.broadcast(flat, src=self.layout.rank_of(d.index, 0), group=self.replica_group)
            with torch.no_grad():
                for b, r in zip(same, _unflatten(flat.to(same[0].device), same), strict=True):
                    b.copy_(r)

    def _all_norms(
        self, d: _Device, batch: int, mine: dict[str, torch.Tensor], board: Board
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

    def _sum_tied(self, d: _Device, names: tuple[str, ...], stages: tuple[int, ...]) -> None:
        mine = _param(d.student, names)
        if d.index != stages[0]:
            grad = mine.grad if mine.grad is not None else torch.zeros_like(mine)
            self._p2p(dist.isend, grad.detach().contiguous(), stages[0], wait=False)
            mine.grad = None
            return
        for k in stages[1:]:
            other = torch.empty_like(mine)
            self._p2p(dist.irecv, other, k, wait=True)
            mine.grad = other if mine.grad is None else mine.grad + other

    def _copy_tied(self, d: _Device, names: tuple[str, ...], stages: tuple[int, ...]) -> None:
        mine = _param(d.student, names)
        if d.index == stages[0]:
            for k in stages[1:]:
                self._p2p(dist.isend, mine.detach().clone(), k, wait=False)
            return
        value = torch.empty_like(mine)
        self._p2p(dist.irecv, value, stages[0], wait=True)
        with torch.no_grad():
            mine.copy_(value)

    def _p2p(self, op: Callable[..., Any], tensor: torch.Tensor, stage: int, *, wait: bool) -> None:
        (work,) = dist.batch_isend_irecv(
            [dist.P2POp(op, tensor, self.layout.rank_of(stage), self.pipeline_group)]
        )
        if wait:
            self._wait(work, "exchanging a tied weight", self.layout.rank_of(stage))
        else:
            self._sends.append((work, [tensor], self.layout.rank_of(stage)))

    # --- weights of every stage ---------------------------------------------------------------

    def stage_state_dicts(self, which: str) -> list[dict[str, torch.Tensor]]:
        """Every stage's state_dict on every rank (pipeline 0's, broadcast), on the CPU."""
        self.drain()
        out = []
        for j in range(self.n_stages):
            src = self.layout.rank_of(j, 0)
            if self.layout.rank == src:
                d = self.devices[0]
                state = (d.student if which == "student" else d.teacher).state_dict()
            else:
                template = (self.student_io if which == "student" else self.teacher_io)[j].module.state_dict()
                state = {n: torch.empty_like(v, device=self.comm) for n, v in template.items()}
            names = list(state)
            for dtype in sorted({state[n].dtype for n in names}, key=str):
                keys = [n for n in names if state[n].dtype == dtype]
                flat = _flatten([state[n].detach().to(self.comm) for n in keys])
                dist.broadcast(flat, src=src)
                for n, v in zip(keys, _unflatten(flat, [state[n] for n in keys]), strict=True):
                    state[n] = v.cpu()
            out.append({n: state[n].cpu() for n in names})
        return out

    def barrier(self) -> None:
        self.drain()
        dist.barrier()


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One buffer for a collective (tensors of one dtype)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    parts = torch.split(flat, [t.numel() for t in like])
    return [part.view_as(t) for part, t in zip(parts, like, strict=True)]


def _by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The tensors grouped by dtype (a flat buffer holds one), in a fixed order."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return [groups[k] for k in sorted(groups, key=str)]
