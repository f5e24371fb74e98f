"""The compiled plan: which nodes of which model run on which device, and what that costs.

Plain frozen data. ``Plan.from_json(plan.to_json()) == plan``; ``tspipe_fx.compile(...,
plan=plan)`` rebuilds the same stages from a saved plan.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tspipe_fx.errors import TspipeError
from tspipe_fx.files import write_text_atomic

__all__ = ["ModelPlan", "Plan", "StagePlan"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class StagePlan:
    """One model's stage on one device; times and bytes per micro-batch."""

    index: int
    device: str
    nodes: tuple[str, ...]  # compute nodes, in order
    inputs: tuple[str, ...]  # values received (stage 0: the model's inputs)
    outputs: tuple[str, ...]  # values sent on (the last stage: the model's outputs)
    first_module: str
    last_module: str
    param_bytes: int
    fwd_flops: int
    fwd_ms: float
    bwd_ms: float
    activation_bytes: int  # kept for backward
    cut_in_bytes: int
    cut_out_bytes: int


@dataclass(frozen=True)
class ModelPlan:
    """How one model is cut."""

    model_name: str
    method: str  # the tracer that captured it
    graph_hash: str
    cuts: tuple[str, ...]  # the first node of stages 1..n-1
    stages: tuple[StagePlan, ...]
    tie_groups: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]  # (tensor names, stages holding it)


@dataclass(frozen=True)
class Plan:
    """Stages of both models, devices, costs and the predicted period.

    Example:
        >>> pipe = tspipe_fx.compile(student, teacher, 2, example_inputs=(x,))
        >>> Plan.from_json(pipe.plan.to_json()) == pipe.plan
        True
    """

    mode: str  # "kd" or "momentum"
    devices: tuple[str, ...]
    batch_size: int
    micro_batches: int
    cost_model: str
    student: ModelPlan
    teacher: ModelPlan
    loads_ms: tuple[float, ...]  # per device, per batch
    memory_bytes: tuple[float, ...]  # per device estimate
    lower_bound_ms: float  # all the work spread perfectly over the devices, no communication
    baselines: tuple[tuple[str, float], ...]  # (policy, its period under this cost model)

    @property
    def n_stages(self) -> int:
        return len(self.devices)

    @property
    def period_ms(self) -> float:
        """The pipeline's predicted time per batch: the most loaded device."""
        return max(self.loads_ms)

    @property
    def imbalance(self) -> float:
        """How far the period is above the ideal lower bound (0.05 = 5%)."""
        return self.period_ms / self.lower_bound_ms - 1 if self.lower_bound_ms > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.batch_size / self.period_ms * 1e3 if self.period_ms > 0 else float("inf")

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["format_version"] = FORMAT_VERSION
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
            if data.pop("format_version", None) != FORMAT_VERSION:
                raise ValueError(f"format_version is not {FORMAT_VERSION}")
            return _plan(data)
        except (ValueError, KeyError, TypeError) as e:
            raise TspipeError(
                f"not a tspipe_fx plan (format {FORMAT_VERSION}): {type(e).__name__}: {e}"
            ) from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        return cls.from_json(Path(path).read_text())


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _model_plan(d: dict[str, Any]) -> ModelPlan:
    stages = tuple(StagePlan(**{k: _tuples(v) for k, v in s.items()}) for s in d.pop("stages"))
    return ModelPlan(stages=stages, **{k: _tuples(v) for k, v in d.items()})


def _plan(d: dict[str, Any]) -> Plan:
    student = _model_plan(d.pop("student"))
    teacher = _model_plan(d.pop("teacher"))
    return Plan(student=student, teacher=teacher, **{k: _tuples(v) for k, v in d.items()})
