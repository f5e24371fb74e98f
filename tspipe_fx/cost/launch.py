"""The host's cost of launching one operation on a device, measured once per device.

Eager PyTorch pays a host cost for every ATen operation (Python, dispatch, the kernel launch);
on a GPU the host runs ahead of the device while kernels are longer than that cost, and the
device waits for the host where they are shorter (small kernels: a ResNet at batch 32 on an
H100). :func:`launch_us` times a loop of one-element operations on the device from the host's
side; :class:`tspipe_fx.cost.builtin.MeasuredCost` takes the longer of a node's measured device
time and its operations (``fwd_ops``, ``bwd_ops``) times this cost.
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["launch_us"]


def launch_us(device: torch.device | str, *, ops: int = 400, repeats: int = 5) -> float:
    """Median host microseconds per operation of ``ops`` in-place adds on one-element tensors
    (the device's work is nothing; what is left is the launch), over ``repeats`` loops."""
    dev = torch.device(device)
    x = torch.zeros(1, device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(ops // 4):  # warm-up: allocator, kernel caches
        x.add_(1.0)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(ops):
            x.add_(1.0)
        times.append((time.perf_counter() - t0) / ops * 1e6)  # host side only: launched, not waited for
        sync()
    return statistics.median(times)
