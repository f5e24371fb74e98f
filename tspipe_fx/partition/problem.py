"""The partition problem as plain data: chains of per-node numbers, devices, and the answer."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from tspipe_fx.errors import TspipeError

__all__ = ["Chain", "Device", "Partition", "PartitionError", "Problem", "StageCost", "StageSums"]


class PartitionError(TspipeError):
    """No partition fits, or the partition request is malformed."""


@dataclass(frozen=True)
class StageSums:
    """One stage of one chain, summed over its nodes (per micro-batch, on the costed device)."""

    fwd_ms: float
    bwd_ms: float
    param_bytes: int
    act_bytes: int


@dataclass(frozen=True)
class Chain:
    """One model as the partitioner sees it: nodes in topological order, candidate cuts.

    A cut at position ``p`` (``0 < p < n``) puts nodes ``[.., p)`` before it and ``[p, ..)``
    after it; ``cuts`` lists the allowed positions with the bytes that cross them.
    """

    fwd_ms: tuple[float, ...]
    bwd_ms: tuple[float, ...]
    param_bytes: tuple[int, ...]
    act_bytes: tuple[int, ...]  # activations kept for backward, per micro-batch
    cuts: tuple[tuple[int, int], ...]  # (position, bytes crossing), increasing positions
    peak_bytes: tuple[int, ...] = ()  # per node, the values alive while it runs (empty: unknown, 0)

    def __post_init__(self) -> None:
        n = len(self.fwd_ms)
        if not (len(self.bwd_ms) == len(self.param_bytes) == len(self.act_bytes) == n) or len(
            self.peak_bytes
        ) not in (0, n):
            raise PartitionError(
                f"chain lists differ in length: fwd {n}, bwd {len(self.bwd_ms)}, params "
                f"{len(self.param_bytes)}, activations {len(self.act_bytes)}, peaks {len(self.peak_bytes)}"
            )
        positions = [p for p, _ in self.cuts]
        if positions != sorted(set(positions)) or any(not 0 < p < n for p in positions):
            raise PartitionError(
                f"cut positions must increase strictly within 1..{n - 1}, got {positions[:10]}..."
            )

    @property
    def n(self) -> int:
        return len(self.fwd_ms)

    def stage_sums(self, cuts: Sequence[int]) -> list[StageSums]:
        """Per stage of the chain cut at positions ``cuts``: its summed costs."""
        bounds = [0, *cuts, self.n]
        return [
            StageSums(
                sum(self.fwd_ms[a:b]),
                sum(self.bwd_ms[a:b]),
                sum(self.param_bytes[a:b]),
                sum(self.act_bytes[a:b]),
            )
            for a, b in itertools.pairwise(bounds)
        ]

    @classmethod
    def uniform(cls, costs: Sequence[float], *, cut_bytes: Sequence[int] | None = None) -> Chain:
        """A chain with forward costs ``costs``, no backward, a cut allowed between every node."""
        n = len(costs)
        cb = list(cut_bytes) if cut_bytes is not None else [0] * (n - 1)
        return cls(tuple(costs), (0.0,) * n, (0,) * n, (0,) * n, tuple((p, cb[p - 1]) for p in range(1, n)))


@dataclass(frozen=True)
class Device:
    """One pipeline device: relative speed, memory and the link to the next device."""

    speed: float = 1.0  # relative to the device the costs were measured on
    memory_bytes: float = math.inf
    link_gbs: float = math.inf  # to the next device, GB/s
    link_latency_ms: float = 0.0
    # workspace a backward takes for its largest weight gradient, in copies of the weight (the
    # gradient made in a blocked layout and converted: one; oneDNN's AVX2 convolutions: four)
    grad_workspace: float = 1.0


@dataclass(frozen=True)
class Problem:
    """What to partition, onto what."""

    student: Chain
    teacher: Chain | None
    devices: tuple[Device, ...]
    micro_batches: int = 1
    optimizer_factor: float = 2.0  # optimizer state per parameter byte: Adam 2, SGD+momentum 1
    in_flight: int | None = None  # student micro-batches whose activations a device holds (default M)
    teacher_fwd_only: bool = True  # the teacher's backward is never run (KD, momentum)
    mirror: bool = False  # momentum: teacher cuts paired with the student's by index
    # per device, the share of its student forwards run again by recompute (empty: none)
    recompute_share: tuple[float, ...] = ()
    # the most student work (forward + backward, ms per micro-batch at the device's speed) one
    # device may hold: the student's synchronous cycle per batch grows with its largest stage
    student_cap_ms: float = math.inf
    # per device, a split backward's (input, weight) halves over its backward, as timed for the
    # stages of one partition (compile's refine); empty: the halves cost the backward, no more
    split_shares: tuple[tuple[float, float], ...] = ()

    def replay_share(self, device: int) -> float:
        """The share of device ``device``'s student forwards its backward runs again."""
        return self.recompute_share[device] if self.recompute_share else 0.0


@dataclass(frozen=True)
class Partition:
    """Cut positions of both chains and what they cost."""

    student_cuts: tuple[int, ...]
    teacher_cuts: tuple[int, ...]
    loads_ms: tuple[float, ...]
    memory_bytes: tuple[float, ...]

    @property
    def period_ms(self) -> float:
        return max(self.loads_ms)


@dataclass(frozen=True)
class StageCost:
    """One device's share of a partition, per micro-batch: the schedule simulator's task costs."""

    student_fwd_ms: float
    student_bwd_ms: float
    teacher_fwd_ms: float
    student_send_ms: float  # an activation (or its gradient) over the link to the next device
    teacher_send_ms: float
