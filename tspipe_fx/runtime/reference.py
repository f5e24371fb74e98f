"""The reference trainer: plain, sequential PyTorch with the pipeline's exact semantics.

It is the oracle of every runtime test and a check users can run themselves: same micro-batch
split (BatchNorm sees the same micro-batches in the same order), the same loss granularity (one
loss over the whole batch, or weighted terms per micro-batch), the same teacher staleness, the
same EMA. Nothing is pipelined.

Per batch ``b``::

    teacher outputs  = join(teacher(micro) for each view, micro-batch)   # weights: version b-1-s
    student outputs  = join(student(micro) for each view, micro-batch)
    loss             = loss_fn(student_out, teacher_out, target)          # KD
                     | loss_fn(s1, s2, t1, t2)                            # two views
    loss.backward(); clip; optimizer.step(); scheduler.step(); zero_grad
    teacher          <- m * teacher + (1 - m) * student                  # momentum: version b
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.batches import batch_size, fed_batch, join_micro
from tspipe_fx.runtime.loss_terms import micro_term
from tspipe_fx.runtime.optim import OptimizerSpec, build_optimizer, parameter_names
from tspipe_fx.runtime.options import TrainOptions
from tspipe_fx.runtime.precision import Precision
from tspipe_fx.runtime.randomness import SeededDraws
from tspipe_fx.runtime.tasks import checked_loss
from tspipe_fx.runtime.teacher import checked_momentum, ema_update

__all__ = ["ReferenceTrainer"]


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


class ReferenceTrainer:
    """Train ``student`` (and a momentum ``teacher``) one batch at a time, in place.

    The options are :class:`~tspipe_fx.runtime.options.TrainOptions`' fields, as for the
    pipelined trainer; ``micro_major`` runs micro-batches before views (as ``1f1b`` does).

    Example:
        >>> ref = ReferenceTrainer(student, teacher, kd_loss, optimizer=lambda p: SGD(p, lr=0.1),
        ...                        micro_batches=4)
        >>> ref.step(x, target=y)
        2.31
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        *,
        optimizer: OptimizerSpec,
        mode: str = "kd",
        micro_major: bool = False,
        **options: Any,
    ):
        if mode not in ("kd", "momentum"):
            raise TspipeError(f"mode must be 'kd' or 'momentum', got {mode!r}")
        opts = TrainOptions.of(optimizer, options, where="ReferenceTrainer")
        self.student, self.teacher, self.loss_fn = student, teacher, loss_fn
        self.mode, self.micro_batches, self.views = mode, opts.micro_batches or 1, opts.views or 1
        self.staleness = (opts.staleness if opts.staleness is not None else 1) if mode == "momentum" else 0
        self.momentum, self.ema_buffers, self.clip_grad_norm, self.seed = (
            opts.momentum,
            opts.ema_buffers,
            opts.clip_grad_norm,
            opts.seed,
        )
        # BatchNorm statistics depend on the order micro-batches pass: views first (tspipe, gpipe)
        # or micro-batches first (1f1b, which needs both views of a micro-batch for its loss).
        self.micro_major = micro_major
        self.loss = opts.loss or "batch"
        self.teacher_parts = opts.teacher_parts or 1
        # Autocast around each forward and the loss; fp16 scales the loss with torch's own GradScaler.
        self.precision = Precision(opts.precision or "fp32")
        self.teacher_precision = Precision(opts.teacher_precision or self.precision.name)
        self.device = next((p.device for p in student.parameters()), torch.device("cpu"))
        self.scaler = torch.amp.GradScaler(self.device.type) if opts.precision == "fp16" else None
        self.drawing: dict[int, bool] = {}  # per model: whether its first forward drew (else no seeding)
        built = build_optimizer(opts.optimizer, dict(student.named_parameters()), parameter_names(student))
        if built is None:
            raise TspipeError("the optimizer holds none of the student's parameters")
        self.optimizer = built
        self.scheduler = opts.lr_scheduler(self.optimizer) if opts.lr_scheduler else None
        self.steps = 0
        # Momentum: the EMA's versions; batch b's teacher reads version b-1-staleness.
        self.versions: collections.deque[dict[str, torch.Tensor]] = collections.deque(
            maxlen=self.staleness + 1
        )
        if mode == "momentum":
            self.versions.append(self._teacher_state())

    def _loss(
        self, student_out: list[Any], teacher_out: list[Any], target: Any, **extra: Any
    ) -> torch.Tensor:
        if self.views == 1:
            return checked_loss(self.loss_fn(student_out[0], teacher_out[0], target, **extra))
        return checked_loss(self.loss_fn(*student_out, *teacher_out, **extra))

    def update_momentum(self, m: float) -> None:
        """Set the EMA momentum for the next steps (cosine schedules)."""
        self.momentum = checked_momentum(m)

    def _ema_tensors(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        items: list[tuple[str, torch.Tensor]] = list(module.named_parameters())
        if self.ema_buffers:
            items += list(module.named_buffers())
        return items

    def _teacher_state(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self._ema_tensors(self.teacher)}

    @torch.no_grad()
    def _load_teacher(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in self._ema_tensors(self.teacher):
            t.copy_(state[n])

    @contextlib.contextmanager
    def _seeded(self, model: int, view: int, micro: int) -> Iterator[None]:
        """A forward's draws seeded by its identity; once a model's first forward drew nothing, its
        forwards run untouched (the pipeline's stages count their draws once too)."""
        if self.drawing.get(model) is False:
            yield
            return
        with SeededDraws(self.seed, model, self.steps, view, micro) as mode:
            yield
        self.drawing.setdefault(model, mode.next > 0)

    def step(
        self,
        *inputs: Any,
        target: Any = None,
        teacher_inputs: Any = None,
        teacher_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> float:
        """Train on one batch; returns its loss (arguments: :meth:`Trainer.step`)."""
        with torch.autocast(device_type=self.device.type, enabled=False):  # ours to set, not the caller's
            return self._step(inputs, kwargs, target, teacher_inputs, teacher_kwargs)

    def _step(self, inputs: tuple[Any, ...], kwargs: dict[str, Any], target: Any, teacher_inputs: Any,
              teacher_kwargs: dict[str, Any] | None) -> float:  # fmt: skip
        fed = fed_batch(self.views, self.micro_batches, inputs, kwargs, target, teacher_inputs, teacher_kwargs,
                        self.teacher_parts)  # fmt: skip
        views = fed.student_args
        if self.mode == "momentum":  # the version this batch may see: the oldest one kept
            self._load_teacher(self.versions[0])
        k = self.teacher_parts

        def order(micro: int) -> list[tuple[int, int]]:  # each model's own order (BatchNorm)
            pairs = [(v, m) for v in range(len(views)) for m in range(micro)]
            return sorted(pairs, key=lambda vm: (vm[1], vm[0])) if self.micro_major else pairs

        t_parts: dict[tuple[int, int], Any] = {}
        s_parts: dict[tuple[int, int], Any] = {}
        # On copies: a model may write its input, and the micro-batches are views of one tensor.
        # Each forward draws by its identity (model 0 student, 1 teacher), as the pipeline's stages do.
        for v, m in order(self.micro_batches * k):
            a, kw = tree_map(_copy, fed.inputs(True, v, m))
            with (
                torch.no_grad(),
                self._seeded(1, v, m),
                self.teacher_precision.autocast(self.device),
            ):
                t_parts[(v, m)] = self.teacher(*a, **kw)
        for v, m in order(self.micro_batches):
            a, kw = tree_map(_copy, fed.inputs(False, v, m))
            with self._seeded(0, v, m), self.precision.autocast(self.device):
                s_parts[(v, m)] = self.student(*a, **kw)
        teacher_out = [
            join_micro([t_parts[(v, m)] for m in range(self.micro_batches * k)]) for v in range(len(views))
        ]
        student_out = [
            join_micro([s_parts[(v, m)] for m in range(self.micro_batches)]) for v in range(len(views))
        ]
        with self.precision.autocast(self.device):
            loss = self._batch_loss(views, s_parts, t_parts, student_out, teacher_out, target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()  # type: ignore[no-untyped-call]
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.mode == "momentum":
            new = {n: t.clone() for n, t in self.versions[-1].items()}
            student = dict(self._ema_tensors(self.student))
            ema_update(new.items(), {n: student[n] for n in new}, self.momentum)
            self.versions.append(new)
            self._load_teacher(new)  # the user's teacher holds the newest EMA between steps
        self.steps += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TspipeError(f"the loss of step {self.steps - 1} is {value}")
        return value

    def _batch_loss(self, views: Any, s_parts: dict[tuple[int, int], Any], t_parts: dict[tuple[int, int], Any],
                    student_out: list[Any], teacher_out: list[Any], target: Any) -> torch.Tensor:  # fmt: skip
        """The batch's loss: one call, or one term per micro-batch weighted by its share."""
        k = self.teacher_parts
        if self.loss == "batch":
            loss = self._loss(student_out, teacher_out, target).float()
        else:  # one term per micro-batch, weighted by its share of the batch
            sizes = [batch_size(a) for a in views[0]]
            loss = torch.zeros(())
            full_teacher = self.loss == "micro_full_teacher"
            for m in range(len(sizes)):
                weight, mine_target, extra = micro_term(sizes, target, m, full_teacher)
                mine = [s_parts[(v, m)] for v in range(len(views))]
                keys = teacher_out  # every key of the batch, or the teacher micro-batches slicing this one
                if not full_teacher:
                    keys = [
                        join_micro([t_parts[(v, i)] for i in range(m * k, (m + 1) * k)])
                        for v in range(len(views))
                    ]
                loss = loss + self._loss(mine, keys, mine_target, **extra).float() * weight
        return loss
