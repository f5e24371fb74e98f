"""Point-to-point messages between neighbouring stages of one pipeline: activations forward,
gradients back, with batched ``isend``/``irecv`` on one process group per neighbouring stage pair
and direction (with virtual stages a rank holds several stages, and the pair of its last and
first devices carries a channel too, stage ``N - 1`` to ``N``).

Shapes and dtypes are known without asking (:mod:`.shapes`: a fake-tensor run of the stages for
the batch's shapes, cached per shape; a gradient has the shape of its output). On a channel the
receiver posts its receives in the sender's task order (every rank knows every device's task
list), so messages match on NCCL, which pairs them by order alone, as on gloo. Sends complete in
their own time; :meth:`Messages.drain` waits for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.batches import Fed
from tspipe_fx.runtime.device import DeviceState
from tspipe_fx.runtime.dist.layout import Layout
from tspipe_fx.runtime.dist.shapes import Spec, boundary_specs, signature
from tspipe_fx.runtime.dist.watchdog import PeerLost
from tspipe_fx.runtime.precision import Precision
from tspipe_fx.schedule.task import Task
from tspipe_fx.stage import StagedModel

__all__ = ["Messages"]

_FWD = ("tf", "sf")


class Messages:
    """This rank's messages to and from its neighbours (see the module docstring)."""

    def __init__(
        self,
        layout: Layout,
        channels: dict[tuple[int, int, int], Any],
        student: StagedModel,
        teacher: StagedModel,
        timeout_s: float,
        precisions: tuple[Precision, Precision],
    ):
        self.layout, self.channels, self.timeout_s = layout, channels, timeout_s
        self.student, self.teacher = student, teacher
        self.precisions = precisions  # the student's and the teacher's: the dtypes that cross
        self.specs: dict[tuple[str, Any], list[dict[str, Any]]] = {}  # per input signature
        self.sends: list[tuple[Any, list[torch.Tensor], int]] = []  # work, its tensors, peer rank
        self.start_window([], {})

    def start_window(self, lists: Sequence[Sequence[Task]], data: dict[int, Fed]) -> None:
        """A new window: its task lists (every stage's) and its batches."""
        self._lists, self._data = lists, data
        self._posted: dict[Any, tuple[list[Any], dict[str, Any]]] = {}
        self._cursor: dict[tuple[int, str], int] = {}
        self._window_specs: dict[tuple[str, int, int, int], list[dict[str, Any]]] = {}

    def check_used(self) -> None:
        """Every message received was taken (else the schedules of two stages disagree)."""
        if self._posted:
            raise TspipeError(f"messages {sorted(self._posted)} were received but not used (a schedule bug)")

    def track(self, work: Any, tensors: list[torch.Tensor], peer: int) -> None:
        """A send of this rank's, to complete in its own time (its tensors kept alive till then)."""
        self.sends.append((work, tensors, peer))

    def settle(self) -> None:
        """Forget the sends that have completed."""
        self.sends = [s for s in self.sends if not s[0].is_completed()]

    def drain(self) -> None:
        """Wait until every message this rank sent has left."""
        for work, _, peer in self.sends:
            self.wait(work, "sending", peer)
        self.sends.clear()

    def send(self, d: DeviceState, key: Any, payload: Any) -> None:
        """Send stage ``d``'s message ``key`` to the neighbour that takes it (no handshake)."""
        kind, j = key[0], key[1]
        to = j + 1 if kind in _FWD else j - 1
        if kind in _FWD:
            specs = self._specs_of(kind, j, key[2], key[3], key[4])
            tensors = []
            for name, (value, _) in payload.items():
                spec = specs[name]
                if isinstance(spec, Spec):
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
        self._isend(tensors, j, to)

    def _isend(self, tensors: list[torch.Tensor], stage: int, to: int) -> None:
        group = self.channels[(self.layout.pipeline, stage, to)]
        peer = self.layout.rank_of(to)
        sent = [t.detach().contiguous() for t in tensors if t.numel()]
        if sent:
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, peer, group) for t in sent])
            for w in works:
                self.track(w, sent, peer)

    def receive(self, d: DeviceState, key: Any) -> Any:
        """Wait for message ``key``, posting this channel's receives in the sender's order."""
        self._post_through(d, key)
        works, payload = self._posted.pop(key)
        for w in works:
            self.wait(w, f"receiving {key}", self.layout.rank_of(key[1]))
        return payload

    def arrived(self, d: DeviceState, key: Any) -> bool:
        """Whether message ``key`` is in (its receives posted now, if they were not yet)."""
        self._post_through(d, key)
        return all(w.is_completed() for w in self._posted[key][0])

    def _post_through(self, d: DeviceState, key: Any) -> None:
        """Post the receives of ``key``'s channel in the sender's order, up to and including it."""
        kind, j = key[0], key[1]
        channel = "fwd" if kind in _FWD else "bwd"
        kinds = _FWD if channel == "fwd" else ("sb",)
        sender = self._lists[self.layout.device_of(j)]  # (its device's list: stage j's tasks in it)
        order = [(t.kind, j, t.batch, t.view, t.micro) for t in sender if t.kind in kinds and t.stage == j]
        at = self._cursor.get((j, channel), 0)
        while key not in self._posted:
            if at >= len(order):
                raise TspipeError(f"stage {j} sends no message {key} in this window (a schedule bug)")
            self._post(d, order[at])
            at += 1
        self._cursor[(j, channel)] = at

    def wait(self, work: Any, what: str, peer: int) -> None:
        """Wait for a point-to-point message; a lost peer is named, not left as a socket error."""
        try:
            done = work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise PeerLost(
                f"lost rank {peer} ({self.layout.where(peer)}) while {what}: {str(e).splitlines()[0]}; hint: "
                "that rank died (killed, out of memory?) or hangs; its own log says which",
                peer,
                self.layout.where(peer),
            ) from e
        if done is False:
            raise TimeoutError(f"waited {self.timeout_s:.0f} s {what} from rank {peer} ({self.layout.where(peer)})")

    def _post(self, d: DeviceState, key: Any) -> None:
        kind, j = key[0], key[1]
        if kind in _FWD:
            specs = self._specs_of(kind, j, key[2], key[3], key[4])
            payload: dict[str, Any] = {}
            buffers = []
            for name, spec in specs.items():
                if isinstance(spec, Spec):
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
            n for n in self.student.stages[j].inputs if isinstance(specs[n], Spec) and specs[n].requires_grad
        ]

    def _specs_of(self, kind: str, j: int, batch: int, view: int, micro: int) -> dict[str, Any]:
        """The outputs of stage ``j`` of the student (``sf``) or teacher (``tf``) for a micro-batch."""
        key = (kind, batch, view, micro)
        if key not in self._window_specs:  # flattening the inputs costs ms: once per micro-batch
            student = kind == "sf"
            model = self.student if student else self.teacher
            flat = model.io.flatten_inputs(*self._data[batch].inputs(not student, view, micro))
            sig = (kind, signature(flat))
            if sig not in self.specs:
                precision = self.precisions[0 if student else 1]
                self.specs[sig] = boundary_specs(model.stages, flat, grad=student, precision=precision)
            self._window_specs[key] = self.specs[sig]
        return self._window_specs[key][j]
