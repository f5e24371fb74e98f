"""Where the stages run: devices resolved, their specs, and the partitioner's view of them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tspipe_fx.cost.devices import DEVICE_SPECS, DeviceSpec
from tspipe_fx.errors import TspipeError
from tspipe_fx.partition.problem import Device

__all__ = ["cpu_grad_workspace", "hardware", "resolve_devices", "spec_for"]


def resolve_devices(devices: Sequence[str | torch.device] | None, n: int) -> list[torch.device]:
    if devices is None:
        if torch.cuda.is_available() and torch.cuda.device_count() >= n:
            return [torch.device("cuda", i) for i in range(n)]
        return [torch.device("cpu")] * n
    if len(devices) != n:
        raise TspipeError(f"{n} stages need {n} devices, got {len(devices)}: {[str(d) for d in devices]}")
    out = []
    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError) as e:
            raise TspipeError(f"not a device: {d!r} ({e})") from None
        if dev.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (dev.index or 0) >= count:
                raise TspipeError(f"device {dev} does not exist: this machine has {count} CUDA devices")
        elif dev.type != "cpu":
            raise TspipeError(f"device {dev}: only 'cpu' and 'cuda' devices are supported")
        out.append(dev)
    return out


def spec_for(dev: torch.device) -> DeviceSpec:
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev).lower()
        for key in ("h100", "a100", "v100"):
            if key in name:
                return DEVICE_SPECS[key]
    return DEVICE_SPECS["cpu"]


def hardware(
    run_on: Sequence[torch.device],
    resolved: Sequence[DeviceSpec],
    given: bool,
    memory_limit: int | Sequence[int] | None,
    precision: str = "fp32",
) -> tuple[Device, ...]:
    """The partitioner's devices: speeds relative to the first spec, memory, links, and (on this
    CPU, at ``precision``) the weight gradients' workspace."""
    n = len(run_on)
    if len(resolved) != n:
        raise TspipeError(f"{n} devices need {n} device_specs, got {len(resolved)}")
    if isinstance(memory_limit, int):
        limits: list[float] = [float(memory_limit)] * n
    elif memory_limit is not None:
        if len(memory_limit) != n:
            raise TspipeError(f"{n} devices need {n} memory limits, got {len(memory_limit)}")
        limits = [float(x) for x in memory_limit]
    elif given:
        limits = [float(s.memory_bytes) for s in resolved]
    else:
        limits = [
            float(torch.cuda.get_device_properties(d).total_memory) if d.type == "cuda" else math.inf
            for d in run_on
        ]
    if any(x <= 0 for x in limits):
        raise TspipeError(f"memory limits must be positive, got {limits}")
    ref = resolved[0].peak_flops()
    return tuple(
        Device(
            speed=s.peak_flops() / ref if given else 1.0,
            memory_bytes=lim,
            link_gbs=s.link_bandwidth_gbs,
            link_latency_ms=s.link_latency_us / 1e3,
            grad_workspace=cpu_grad_workspace(precision) if d.type == "cpu" and not given else 1.0,
        )
        for d, s, lim in zip(run_on, resolved, limits, strict=True)
    )


def cpu_grad_workspace(precision: str = "fp32") -> float:
    """This CPU's workspace for a backward's weight gradient, in copies of the weight: oneDNN's
    AVX2 fp32 convolution kernels take four (on an AMD EPYC, 36.07 MB beside a 512 x 512 x 3 x 3
    weight of 9.44 MB; its bf16 ones do not); elsewhere one (the blocked copy the gradient is
    converted from; measured on AVX-512 Xeons)."""
    return 4.0 if precision == "fp32" and torch.backends.cpu.get_cpu_capability() == "AVX2" else 1.0
