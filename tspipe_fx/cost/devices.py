"""Device specifications for the roofline cost model and the partitioner's links and memory.

Figures are the vendors' datasheet numbers (dense, no sparsity); ``register_device_spec`` adds
a user's own. Links are per direction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tspipe_fx.errors import TspipeError

__all__ = ["DEVICE_SPECS", "LINKS", "DeviceSpec", "device_spec", "register_device_spec"]

GiB = 2**30


@dataclass(frozen=True)
class DeviceSpec:
    """What a device can do, for cost models and memory limits.

    Example:
        >>> my = DeviceSpec("l4", tflops={"float32": 30.3, "bfloat16": 121.0},
        ...                 memory_bandwidth_gbs=300, memory_bytes=24 * GiB)
        >>> register_device_spec(my)
    """

    name: str
    tflops: dict[str, float] = field(hash=False)  # dense peak per dtype ("float32", "bfloat16", ...)
    memory_bandwidth_gbs: float  # device memory bandwidth, GB/s
    memory_bytes: int  # device memory
    link_bandwidth_gbs: float = 25.0  # to the neighbouring pipeline stage, GB/s per direction
    link_latency_us: float = 10.0  # per message
    launch_overhead_us: float = 5.0  # fixed cost of one op (kernel launch, dispatch)

    def peak_flops(self, dtype: str = "float32") -> float:
        """Peak FLOP/s at ``dtype`` (falls back to float32)."""
        return self.tflops.get(dtype, self.tflops["float32"]) * 1e12

    def with_link(self, link: str) -> DeviceSpec:
        """The same device connected by one of :data:`LINKS` ("nvlink4", "pcie4", ...)."""
        if link not in LINKS:
            raise TspipeError(f"unknown link {link!r}; known: {sorted(LINKS)}")
        bandwidth, latency = LINKS[link]
        return dataclasses.replace(self, link_bandwidth_gbs=bandwidth, link_latency_us=latency)


# (GB/s per direction, latency us)
LINKS: dict[str, tuple[float, float]] = {
    "nvlink2": (150.0, 5.0),  # V100 SXM2: 6 links x 25 GB/s
    "nvlink3": (300.0, 5.0),  # A100 SXM: 12 links x 25 GB/s
    "nvlink4": (450.0, 5.0),  # H100 SXM: 18 links x 25 GB/s
    "pcie3": (12.0, 10.0),  # x16, achievable
    "pcie4": (25.0, 10.0),
    "pcie5": (50.0, 10.0),
    "shm": (10.0, 20.0),  # two CPU processes through shared memory (gloo on one host)
}

DEVICE_SPECS: dict[str, DeviceSpec] = {}


def register_device_spec(spec: DeviceSpec) -> DeviceSpec:
    """Add (or replace) a named spec, usable wherever a device name is accepted."""
    if not isinstance(spec, DeviceSpec):
        raise TspipeError(f"register_device_spec needs a DeviceSpec, got {type(spec).__name__}")
    if "float32" not in spec.tflops:
        raise TspipeError(f"device spec {spec.name!r} needs a 'float32' entry in tflops, got {spec.tflops}")
    DEVICE_SPECS[spec.name] = spec
    return spec


def device_spec(spec: str | DeviceSpec) -> DeviceSpec:
    """Look up a spec by name, or pass one through."""
    if isinstance(spec, DeviceSpec):
        return spec
    try:
        return DEVICE_SPECS[spec.lower()]
    except KeyError:
        raise TspipeError(
            f"unknown device spec {spec!r}; known: {sorted(DEVICE_SPECS)}; hint: "
            "register_device_spec(DeviceSpec(...)) adds your own"
        ) from None


for _spec in (
    DeviceSpec("h100", {"float32": 67.0, "tfloat32": 494.7, "bfloat16": 989.4, "float16": 989.4},
               memory_bandwidth_gbs=3350.0, memory_bytes=80 * GiB, link_bandwidth_gbs=450.0,
               link_latency_us=5.0, launch_overhead_us=4.0),
    DeviceSpec("a100", {"float32": 19.5, "tfloat32": 156.0, "bfloat16": 312.0, "float16": 312.0},
               memory_bandwidth_gbs=2039.0, memory_bytes=80 * GiB, link_bandwidth_gbs=300.0,
               link_latency_us=5.0, launch_overhead_us=4.0),
    DeviceSpec("v100", {"float32": 15.7, "float16": 125.0},
               memory_bandwidth_gbs=900.0, memory_bytes=32 * GiB, link_bandwidth_gbs=150.0,
               link_latency_us=5.0, launch_overhead_us=5.0),
    # A generic 2-core x86 server slice (this project's CI machine): AVX-512 FMA peak is
    # ~150 GFLOP/s, PyTorch reaches about half of it on large GEMMs.
    DeviceSpec("cpu", {"float32": 0.08, "bfloat16": 0.04},
               memory_bandwidth_gbs=15.0, memory_bytes=16 * GiB, link_bandwidth_gbs=10.0,
               link_latency_us=20.0, launch_overhead_us=8.0),
):  # fmt: skip
    register_device_spec(_spec)
