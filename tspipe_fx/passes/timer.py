"""Wall time of a callable on one device: CUDA events on a GPU, ``perf_counter`` elsewhere."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Timer", "spin_cycles_per_ms"]


class Timer:
    """Median wall time of a callable on one device, in milliseconds.

    On CUDA, ``hide_host=True`` times the device's work alone, as it runs inside a whole model
    whose kernels queue back to back: a spin kernel long enough to cover the host's launch goes
    first, so the start event fires only once the call's kernels are queued. Timing each
    isolated node from an idle device made it pay its launch latency on top of its work (on an
    H100 the node sums of a ViT-L came to 1.35x its measured forward, of a ResNet-152 2.4x);
    taking the slower of host and device time per node was worse still (2.05x for the
    ResNet-152: an isolated call's host time is far above its share inside a model). See
    the benchmarks README, GPU section.
    """

    def __init__(self, device: torch.device | str, *, hide_host: bool = False):
        self.device = torch.device(device)
        self.hide_host = hide_host and self.device.type == "cuda"
        self._cycles_per_ms = 0.0
        self._host_ms = 0.0

    def median_ms(
        self, fn: Callable[[], Any], *, repeats: int, warmup: int, setup: Callable[[], Any] | None = None
    ) -> float:
        """Run ``fn`` ``warmup`` times, then time ``repeats`` runs; ``setup`` runs untimed before each."""
        self._host_ms = 0.0
        for _ in range(warmup):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            self._host_ms = max(self._host_ms, (time.perf_counter() - t0) * 1e3)
        samples = []
        for _ in range(repeats):
            if setup is not None:
                setup()
            samples.append(self.once(fn))
        return statistics.median(samples)

    def once(self, fn: Callable[[], Any]) -> float:
        """Milliseconds of one call of ``fn`` (no warm-up)."""
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            torch.cuda.synchronize(self.device)
            if self.hide_host:
                torch.cuda._sleep(self._spin_cycles())  # type: ignore[no-untyped-call]
            start.record()
            t0 = time.perf_counter()
            fn()
            end.record()
            self._host_ms = max(self._host_ms, (time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize(self.device)
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def _spin_cycles(self) -> int:
        """Clock cycles of spin that outlast the host time of one call (twice it, 50 us at least)."""
        if not self._cycles_per_ms:
            self._cycles_per_ms = spin_cycles_per_ms(self.device)
        return int(self._cycles_per_ms * max(2 * self._host_ms, 0.05))


def spin_cycles_per_ms(device: torch.device) -> float:
    """Clock cycles per millisecond of ``torch.cuda._sleep``, the spin kernel, on ``device``."""
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    torch.cuda.synchronize(device)
    start.record()
    torch.cuda._sleep(10_000_000)  # type: ignore[no-untyped-call]
    end.record()
    torch.cuda.synchronize(device)
    return 10_000_000 / max(float(start.elapsed_time(end)), 1e-3)
