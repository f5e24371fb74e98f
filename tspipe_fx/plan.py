"""The compiled plan: which nodes of which model run on which device, what that costs, and the
schedule it was tuned for.

Plain frozen data. ``Plan.from_json(plan.to_json()) == plan``; ``tspipe_fx.compile(...,
plan=plan)`` rebuilds the same stages from a saved plan. The plan records the schedule, its
micro-batches, views and teacher staleness, and :meth:`Plan.build_schedule` is the one place a
schedule is made from them: compile's polish, the trainer and :func:`simulate_plan` all call it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from tspipe_fx.errors import TspipeError
from tspipe_fx.files import read_text, write_text_atomic
from tspipe_fx.schedule.generators import SCHEDULES, make_schedule
from tspipe_fx.schedule.simulator import Timeline, simulate_stages, transfer_ms
from tspipe_fx.schedule.task import Schedule

__all__ = ["ModelPlan", "Plan", "StagePlan", "simulate_plan"]

# 2 added schedule, views and staleness; a format-1 plan reads with the defaults it was made with.
FORMAT_VERSION = 2


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
    schedule: str = "tspipe"  # the schedule the cuts were polished for and the trainer runs
    views: int = 1  # inputs per sample (two-view SSL: 2)
    staleness: int = 1  # momentum: batch b's teacher sees the EMA after step b-1-staleness

    def __post_init__(self) -> None:
        _check(self)

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

    def build_schedule(self, n_batches: int = 4) -> Schedule:
        """The plan's schedule over ``n_batches`` batches."""
        return make_schedule(self.schedule, self.n_stages, self.micro_batches, views=self.views,
                             mode=self.mode, staleness=self.staleness, n_batches=n_batches)  # fmt: skip

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["format_version"] = FORMAT_VERSION
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
            version = data.pop("format_version", None)
            if version not in (1, FORMAT_VERSION):
                raise ValueError(f"format_version is not 1 or {FORMAT_VERSION}")
            if version == 1:  # tuned for one view; simulated with BYOL's two in momentum mode
                data.update(schedule="tspipe", views=2 if data.get("mode") == "momentum" else 1, staleness=1)
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
        return cls.from_json(read_text(path, "plan", TspipeError))


def _check(plan: Plan) -> None:
    """Every field of a plan, made or loaded, within its range; the error names the field and value."""

    def bad(field: str, rule: str) -> TspipeError:
        return TspipeError(f"plan field {field} must be {rule}, got {getattr(plan, field)!r}")

    def count(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if plan.mode not in ("kd", "momentum"):
        raise bad("mode", "'kd' or 'momentum'")
    if not plan.devices or not all(isinstance(d, str) for d in plan.devices):
        raise bad("devices", "a non-empty list of device names")
    if not count(plan.batch_size, 1):
        raise bad("batch_size", "an integer >= 1")
    if not count(plan.micro_batches, 1) or plan.micro_batches > plan.batch_size:
        raise bad("micro_batches", f"an integer from 1 to the batch size {plan.batch_size}")
    if plan.schedule not in SCHEDULES:
        raise bad("schedule", f"one of {sorted(SCHEDULES)}")
    if plan.views not in (1, 2) or isinstance(plan.views, bool):
        raise bad("views", "1 or 2")
    if plan.staleness not in (0, 1) or isinstance(plan.staleness, bool):
        raise bad("staleness", "0 or 1")
    n = plan.n_stages
    for field in ("loads_ms", "memory_bytes"):
        values = getattr(plan, field)
        if len(values) != n or not all(isinstance(v, (int, float)) and v >= 0 for v in values):
            raise bad(field, f"{n} numbers >= 0 (one per device)")
    if not isinstance(plan.lower_bound_ms, (int, float)) or plan.lower_bound_ms < 0:
        raise bad("lower_bound_ms", "a number >= 0")
    for role in ("student", "teacher"):
        model: ModelPlan = getattr(plan, role)
        stages = model.stages
        if [s.index for s in stages] != list(range(n)) or any(not s.nodes for s in stages):
            raise TspipeError(
                f"plan field {role}.stages must be {n} non-empty stages indexed 0..{n - 1}, got indices "
                f"{[s.index for s in stages]}"
            )
        if tuple(model.cuts) != tuple(s.nodes[0] for s in stages[1:]):
            raise TspipeError(
                f"plan field {role}.cuts must name the first node of stages 1..{n - 1}, got {list(model.cuts)}"
            )


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _model_plan(d: dict[str, Any]) -> ModelPlan:
    stages = tuple(StagePlan(**{k: _tuples(v) for k, v in s.items()}) for s in d.pop("stages"))
    return ModelPlan(stages=stages, **{k: _tuples(v) for k, v in d.items()})


def _plan(d: dict[str, Any]) -> Plan:
    student = _model_plan(d.pop("student"))
    teacher = _model_plan(d.pop("teacher"))
    return Plan(student=student, teacher=teacher, **{k: _tuples(v) for k, v in d.items()})


def simulate_plan(
    plan: Plan,
    schedule: str | None = None,
    *,
    views: int | None = None,
    n_batches: int = 6,
    link: tuple[float, float] | None = None,
) -> Timeline:
    """The plan's per-stage costs through a schedule.

    Args:
        plan: a compiled plan; its stage times are per micro-batch.
        schedule: ``tspipe``, ``gpipe``, ``1f1b`` or ``sequential`` (default: the plan's).
            ``sequential`` (inter-layer model parallelism, one micro-batch per batch) runs each
            stage on the whole batch, costed as the plan's micro-batch costs times its
            ``micro_batches`` (linear in the batch: a GPU's better efficiency on larger batches
            is not counted).
        views: 1 or 2 (default: the plan's).
        link: ``(GB/s, latency µs)`` per transfer between neighbouring devices
            (:data:`tspipe_fx.cost.devices.LINKS`); None: transfers are free.

    Example:
        >>> simulate_plan(pipe.plan, "tspipe").period / simulate_plan(pipe.plan, "gpipe").period
    """
    name = schedule if schedule is not None else plan.schedule
    scale = plan.micro_batches if name == "sequential" else 1
    s = dataclasses.replace(plan, schedule=name, views=views or plan.views).build_schedule(n_batches)
    gbs, latency_us = link if link is not None else (float("inf"), 0.0)

    def send_ms(cut_bytes: int) -> float:
        return transfer_ms(cut_bytes * scale, gbs, latency_us / 1e3) if link is not None else 0.0

    pairs = list(zip(plan.student.stages, plan.teacher.stages, strict=True))
    return simulate_stages(
        s,
        student_fwd_ms=[st.fwd_ms * scale for st, _ in pairs],
        student_bwd_ms=[st.bwd_ms * scale for st, _ in pairs],
        teacher_fwd_ms=[te.fwd_ms * scale for _, te in pairs],
        student_send_ms=[send_ms(st.cut_out_bytes) for st, _ in pairs],
        teacher_send_ms=[send_ms(te.cut_out_bytes) for _, te in pairs],
    )
