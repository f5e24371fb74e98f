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
- :func:`step_host_us` divides the host's time for one training step of the model itself by the
  operations it dispatches, the device kept busy so that the host never waits for it: what an
  operation of that model costs the host (32 us for a ResNet-152's convolutions, batch norms
  and their backward on the same host). A profile on a GPU keeps the larger of the two.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tspipe_fx.passes.measure import OpCount
from tspipe_fx.passes.timer import spin_cycles_per_ms

__all__ = ["launch_us", "step_host_us"]


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


def step_host_us(step: Callable[[], Any], device: torch.device | str, *, repeats: int = 5) -> float | None:
    """Median host microseconds per ATen operation of ``step`` (one forward and backward of a
    model): the time until the host returns, over the operations the step dispatches (counted
    once, before). ``step`` must have run once already (the first run allocates). On a CPU this
    is the step's whole time per operation.

    On a GPU the host must not wait for the device while it is timed, or a step of small kernels
    (host-bound) and one of more kernels than the launch queue holds (the host held back by the
    device) would read alike. So each timed step queues behind a spin kernel three times the
    host's time: the host returning while the spin still runs never waited for the device. None
    where it did (the figure would read the device's time, not the host's).
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    with OpCount() as counted:
        step()
    _sync(dev)
    t0 = time.perf_counter()
    step()
    host_ms = (time.perf_counter() - t0) * 1e3
    _sync(dev)
    cycles = int(spin_cycles_per_ms(dev) * max(3 * host_ms, 1.0)) if cuda else 0
    times, waited = [], False
    for _ in range(repeats):
        _sync(dev)
        if cuda:
            torch.cuda._sleep(cycles)  # type: ignore[no-untyped-call]
            spun = torch.cuda.Event()  # type: ignore[no-untyped-call]
            spun.record()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e6)
        waited = waited or (cuda and spun.query())  # type: ignore[no-untyped-call]  # the spin was over
    _sync(dev)
    return None if waited else statistics.median(times) / max(counted.count, 1)


def _sync(dev: torch.device) -> None:
    """Wait for the device (a CPU's work is done when its call returns)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
