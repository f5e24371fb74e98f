"""Reproducible randomness: every random draw of a forward (dropout, drop-path, stochastic depth)
comes from a seed derived from the run's seed and the draw's identity, never from shared state.

A draw's identity is ``(model, batch, view, micro-batch, ordinal)``, the ordinal counting the
random operations of that micro-batch's forward through the whole model in execution order. The
identity does not know threads, ranks, stage boundaries or the number of devices, so neither do
the masks: a 2-stage and a 3-stage pipeline and the unsplit model (the reference trainer) draw
alike. A stage starts counting where the stages before it stopped (:func:`draw_counts` counts
each stage's random operations once, on fake tensors).

Random operations are found at the ATen level (the ``nondeterministic_seeded`` tag), below every
way a model is written (modules, functionals, ``torch.export`` graphs), so a draw nested inside
another operation (``nn.MultiheadAttention``'s attention dropout) is seen too. Each one runs
with its device's default generator seeded for it, under a process-wide lock, and the generator
is put back afterwards: the caller's own random state does not move. Stages that draw nothing
run without the interception (it costs tens of microseconds per ATen operation).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tspipe_fx.errors import TspipeError
from tspipe_fx.stage import Stage

__all__ = ["ModelDraws", "SeededDraws", "derive_seed", "draw_counts"]

_LOCK = threading.Lock()  # a CPU generator is one per process: one draw at a time
_MASK = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 over them): nearby identities, unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & _MASK)) & _MASK
        h = (h + 0x9E3779B97F4A7C15) & _MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        h ^= h >> 31
    return h >> 1


def _draws(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether an ATen call draws: it is tagged so, and it is no attention with ``dropout_p=0``
    (CPU's fused attention is tagged whether or not it drops anything)."""
    if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return False
    for i, a in enumerate(func._schema.arguments):
        if a.name == "dropout_p":
            value = (
                args[i]
                if i < len(args)
                else kwargs.get(a.name, a.default_value if a.has_default_value() else 1)
            )
            return bool(value != 0)
    return True


def _generator(args: Any, kwargs: dict[str, Any]) -> torch.Generator:
    """The default generator the operation would draw from: its tensors' device's."""
    device = kwargs.get("device")
    if device is None:
        device = next((x.device for x in tree_flatten(args)[0] if isinstance(x, torch.Tensor)), None)
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ]
    raise TspipeError(
        f"a random operation on a {device.type} device: reproducible draws support cpu and cuda; "
        "hint: run the stages on cpu or cuda, or take the randomness out of the model"
    )


class SeededDraws(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Within it, random operation ``k`` (counting from ``start``) draws from
    ``derive_seed(seed, model, batch, view, micro, k)``; ``self.next`` is the next ordinal.
    ``model``: 0 the student, 1 the teacher."""

    def __init__(self, seed: int, model: int, batch: int, view: int, micro: int, start: int = 0):
        super().__init__()  # type: ignore[no-untyped-call]
        self.key = (seed, model, batch, view, micro)
        self.start = self.next = start

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not _draws(func, args, kwargs):
            return func(*args, **kwargs)
        generator = _generator(args, kwargs)
        with _LOCK:
            saved = generator.get_state()
            generator.manual_seed(derive_seed(*self.key, self.next))
            self.next += 1
            try:
                return func(*args, **kwargs)
            finally:
                generator.set_state(saved)


class _Counter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.count += _draws(func, args, kwargs)
        return func(*args, **kwargs)


def draw_counts(stages: Sequence[Stage], inputs: Sequence[Any]) -> list[int]:
    """Each stage's random operations per forward, from a run on fake tensors (nothing real is
    touched, no generator moves)."""
    counts = []
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        env: dict[str, Any] = {
            n: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
            for n, x in zip(stages[0].inputs, inputs, strict=True)
        }
        for st in stages:
            with torch.no_grad(), _Counter() as counter:  # the same operations draw with or without grad
                values = tuple(st.module(*(env[n] for n in st.inputs)))
            counts.append(counter.count)
            env.update(zip(st.outputs, values, strict=True))
    return counts


@dataclass(frozen=True)
class ModelDraws:
    """One model's random operations per forward, per stage (see :func:`draw_counts`)."""

    model: int  # 0 the student, 1 the teacher
    counts: tuple[int, ...]

    @contextlib.contextmanager
    def seeded(self, seed: int, stage: int, batch: int, view: int, micro: int) -> Iterator[None]:
        """Stage ``stage``'s forward of a micro-batch, its draws numbered after the earlier stages'."""
        if not self.counts[stage]:  # nothing to seed: no interception either
            yield
            return
        start = sum(self.counts[:stage])
        with SeededDraws(seed, self.model, batch, view, micro, start) as mode:
            yield
        if mode.next - start != self.counts[stage]:
            raise TspipeError(
                f"{('student', 'teacher')[self.model]} stage {stage} ran {mode.next - start} random "
                f"operations where its first forward ran {self.counts[stage]}; hint: reproducible draws "
                "need the same random operations in every forward (no data-dependent randomness)"
            )
