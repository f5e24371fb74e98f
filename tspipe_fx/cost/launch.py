"""The host's cost of launching one operation on a device.

Eager PyTorch pays a host cost for every ATen operation (Python, dispatch, autograd's
recording, the kernel launch); on a GPU the host runs ahead of the device while kernels are
longer than that cost, and the device waits for the host where they are shorter (small
kernels: a ResNet-152 at micro-batches up to 32 on an H200). :class:`tspipe_fx.cost.builtin.
MeasuredCost` takes the longer of a node's measured device time and its operations
(``fwd_ops``, ``bwd_ops``) times this cost, so that smaller micro-batches do not look cheaper
than the host lets them be.

- :func:`launch_us` times a loop of one-element in-place adds from the host's side: the floor
  of any operation (6 us on an H200's host).
- :func:`step_host_us` divides the host's time for the forward and for the backward of one
  training step of the model itself by the operations each dispatches, where the host did not
  wait for the device: what an operation of that model costs the host (on one H200 lease's
  host, 41 us a ResNet-152 forward operation and 49 us a backward one, where the loop read
  7-11 us). A profile on a GPU keeps the larger of that and the loop's figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tspipe_fx.passes.measure import OpCount
from tspipe_fx.passes.timer import spin_cycles_per_ms

__all__ = ["HOST_BOUND", "launch_us", "step_host_us"]

HOST_BOUND = 0.9  # a step whose device works at most this share of its wall time is host-bound


def launch_us(device: torch.device | str, *, ops: int = 400, repeats: int = 5) -> float:
    """Median host microseconds per operation of ``ops`` in-place adds on one-element tensors
    (the device's work is nothing; what is left is the launch), over ``repeats`` loops."""
    dev = torch.device(device)
    x = torch.zeros(1, device=dev)
    for _ in range(ops // 4):  # warm-up: allocator, kernel caches
        x.add_(1.0)
    _sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(ops):
            x.add_(1.0)
        times.append((time.perf_counter() - t0) / ops * 1e6)  # host side only: launched, not waited for
        _sync(dev)
    return statistics.median(times)


def step_host_us(
    parts: Callable[[], Any] | Sequence[Callable[[], Any]],
    device: torch.device | str,
    *,
    repeats: int = 5,
    device_ms: float | None = None,
) -> tuple[float, ...] | None:
    """Median host microseconds per ATen operation of one training step of a model, per part:
    ``parts`` is the step, or its parts in order (its forward, then its backward), and each
    part's figure is the time until the host returns from it over the operations it dispatches
    (counted once, before). The step must have run once already (the first run allocates). On a
    CPU this is the part's whole time per operation.

    On a GPU the host must not wait for the device while it is timed, or a step of small kernels
    (host-bound) and one of more kernels than the launch queue holds (the host held back by the
    device) would read alike. So each timed part queues behind a spin kernel three times the
    host's time for it: the host returning while the spin still runs never waited for the
    device. The launch queue holds about a thousand kernels (1021 on an H200): time a large
    model in its two parts.

    Where a part still launched more (a ResNet-152's forward: cuDNN launches several kernels a
    convolution) the spin cannot tell. Then, given ``device_ms`` (the device's work of one step:
    the sum of its nodes' measured times), a step whose device idled at least a tenth of its wall
    time was host-bound: the device kept up, the host hardly waited, and its return time from
    each part of a plain step is the figure. None where the device was busier than that (the
    figure would read the device's time, not the host's).
    """
    dev = torch.device(device)
    steps = [parts] if callable(parts) else list(parts)
    ops = []
    for part in steps:
        with OpCount() as counted:
            part()
        ops.append(max(counted.count, 1))
    _sync(dev)
    rate = spin_cycles_per_ms(dev) if dev.type == "cuda" else 0.0
    cycles = []
    for part in steps:
        t0 = time.perf_counter()
        part()
        cycles.append(int(rate * max(3e3 * (time.perf_counter() - t0), 1.0)))
        _sync(dev)
    times: list[list[float]] = [[] for _ in steps]
    waited = False
    for _ in range(repeats):
        for i, part in enumerate(steps):
            t, over = _host_time(part, dev, cycles[i])
            times[i].append(t)
            waited = waited or over
    _sync(dev)
    if waited:
        if device_ms is None:
            return None
        times, wall_ms = _plain_times(steps, dev, repeats)
        if device_ms > HOST_BOUND * wall_ms:
            return None
    return tuple(statistics.median(t) / n for t, n in zip(times, ops, strict=True))


def _plain_times(
    steps: list[Callable[[], Any]], dev: torch.device, repeats: int
) -> tuple[list[list[float]], float]:
    """Host microseconds of each part of plain steps (no spin; the device waited for after each
    part), and the median wall milliseconds of the whole step."""
    times: list[list[float]] = [[] for _ in steps]
    walls = []
    for _ in range(repeats):
        wall = 0.0
        for i, part in enumerate(steps):
            _sync(dev)
            t0 = time.perf_counter()
            part()
            times[i].append((time.perf_counter() - t0) * 1e6)
            _sync(dev)
            wall += time.perf_counter() - t0
        walls.append(wall * 1e3)
    return times, statistics.median(walls)


def _host_time(part: Callable[[], Any], dev: torch.device, cycles: int) -> tuple[float, bool]:
    """Host microseconds of one call of ``part`` behind a spin of ``cycles`` (on a GPU), and
    whether the spin was over when the host returned (the host may have waited for the device)."""
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda._sleep(cycles)  # type: ignore[no-untyped-call]
        spun = torch.cuda.Event()  # type: ignore[no-untyped-call]
        spun.record()
    t0 = time.perf_counter()
    part()
    elapsed = (time.perf_counter() - t0) * 1e6
    return elapsed, dev.type == "cuda" and bool(spun.query())  # type: ignore[no-untyped-call]


def _sync(dev: torch.device) -> None:
    """Wait for the device (a CPU's work is done when its call returns)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
