"""Compiled stages: ``compile_stages=True`` (or a ``torch.compile`` mode) compiles each stage's
GraphModule on its device, in place (``nn.Module.compile``: names, state_dicts and checkpoints
are those of the eager stage).

* The toolchain is checked before anything runs: inductor builds C++ for CPU stages (a C++
  compiler on PATH or in ``$CXX``) and Triton kernels for CUDA stages.
* A stage that draws random numbers stays eager: its draws are seeded by their identity at the
  ATen level (:mod:`.randomness`), which compiled code would bypass. The trainer warns which.
* Compiled code is one autograd node per stage, so a split backward has nothing to split there
  (and inductor's backward cannot be run in two passes): the input-gradient task computes the
  weights' gradients too, and the weight-gradient task has nothing left to do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import threading
import warnings
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any

import torch

from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.device import DeviceState
from tspipe_fx.runtime.randomness import ModelDraws

__all__ = ["MODES", "CompileGate", "check_toolchain", "checked_compile", "compile_stages", "shapes"]

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def checked_compile(value: Any) -> str | None:
    """The ``torch.compile`` mode ``compile_stages=`` asks for (None: eager)."""
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in MODES:
        return value
    raise TspipeError(
        f"compile_stages must be True, False or a torch.compile mode {list(MODES)}, got {value!r}"
    )


def check_toolchain(devices: Sequence[torch.device]) -> None:
    """Refuse, saying what is missing, where inductor cannot compile for ``devices``."""
    problem = _toolchain_problem(devices)
    if problem is not None:
        raise TspipeError(problem)


def _toolchain_problem(devices: Sequence[torch.device]) -> str | None:
    types = {torch.device(d).type for d in devices}
    if "cpu" in types:
        cxx = os.environ.get("CXX")
        if not (cxx and shutil.which(cxx)) and not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
            return (
                "compiling CPU stages needs a C++ compiler (inductor generates C++): none on PATH "
                "(g++, clang++, c++) nor in $CXX; hint: install one (apt install g++), or train "
                "eager (compile_stages=False)"
            )
    if "cuda" in types and importlib.util.find_spec("triton") is None:
        return (
            "compiling CUDA stages needs Triton (inductor generates Triton kernels), which is not "
            "installed; hint: pip install triton, or train eager (compile_stages=False)"
        )
    return None


def compile_stages(devices: Sequence[DeviceState], draws: dict[int, ModelDraws], mode: str) -> None:
    """Compile each device's student and teacher stage in place; those that draw stay eager (warned)."""
    eager = []
    for d in devices:
        for key, role, module in ((0, "student", d.student), (1, "teacher", d.teacher)):
            if draws[key].counts[d.index]:
                eager.append(f"{role} stage {d.index}")
            else:
                module.compile(mode=mode)
    if eager:
        warnings.warn(
            f"compile_stages: {', '.join(eager)} draw random numbers and stay eager (reproducible "
            "draws are seeded per operation, which compiled code would bypass)",
            stacklevel=3,
        )


class CompileGate:
    """Lets one device thread at a time run a call that may compile, while the others wait.

    ``torch.compile`` traces a stage at its first call (and again for inputs of a new shape): its
    tracer patches ``nn.Module.__call__`` for the whole process, and a compiled stage called from
    another device's thread meanwhile fails ("FX to symbolically trace a dynamo-optimized
    function"; seen on an H200, torch 2.11, two stages on one GPU). So a call whose key (stage,
    direction, input shapes) is new runs alone; calls of keys seen before run side by side. No
    gate is held while a task waits for a message, so no thread waits on one that waits for it.
    Disabled (``enabled=False``: eager stages), it lets every call through.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._cond = threading.Condition()
        self._running = 0  # calls inside now
        self._alone = False  # a new key's call is inside
        self._waiting = 0  # new keys' calls waiting: known ones let them in first
        self._seen: set[Hashable] = set()

    @contextlib.contextmanager
    def call(self, key: Hashable) -> Iterator[None]:
        """Run the body alone if ``key`` is new, else beside other known keys' calls."""
        if not self.enabled:
            yield
            return
        with self._cond:
            new = key not in self._seen
            self._waiting += new
            self._cond.wait_for(
                lambda: not self._alone and (self._running == 0 if new else not self._waiting)
            )
            self._waiting -= new
            self._running += 1
            self._alone = new
        try:
            yield
            if new:
                self._seen.add(key)
        finally:
            with self._cond:
                self._running -= 1
                self._alone = self._alone and not new
                self._cond.notify_all()


def shapes(values: Iterable[Any]) -> tuple[Any, ...]:
    """The shapes and dtypes of the tensors among ``values`` (a compiled call's guard keys)."""
    return tuple((tuple(x.shape), x.dtype) for x in values if isinstance(x, torch.Tensor))
