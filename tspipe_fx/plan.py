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
from tspipe_fx.schedule.costs import StageCosts, at_least_whole, transfer_ms
from tspipe_fx.schedule.generators import SCHEDULES, make_schedule
from tspipe_fx.schedule.memory import RECOMPUTE, StageMemory, replay_share
from tspipe_fx.schedule.simulator import Timeline, simulate_costs
from tspipe_fx.schedule.task import LOSSES, Schedule

__all__ = ["PRECISIONS", "ModelPlan", "Plan", "StagePlan", "compute_bytes", "simulate_plan"]

# 2 added schedule, views and staleness; 3 the loss granularity and the links, and every time per
# batch counts every view. An older plan reads with the defaults it was made with.
FORMAT_VERSION = 3
PRECISIONS = ("fp32", "bf16", "fp16")  # the compute dtypes a plan prices and a trainer runs


def compute_bytes(precision: str) -> int:
    """Bytes per element of an activation under ``precision`` (the weights stay fp32)."""
    return 4 if precision == "fp32" else 2


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
    split_shares: tuple[float, ...] = ()  # a split backward's (input, weight) halves over bwd_ms, as timed


@dataclass(frozen=True)
class ModelPlan:
    """How one model is cut."""

    model_name: str
    method: str  # the tracer that captured it
    graph_hash: str
    cuts: tuple[str, ...]  # the first node of stages 1..n-1
    stages: tuple[StagePlan, ...]
    tie_groups: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]  # (tensor names, stages holding it)

    def timed_split(self) -> tuple[tuple[float, float], ...]:
        """Per stage, its split backward's (input, weight) halves as timed, never below the whole
        backward (plans saved before that rule priced some below it); empty unless every stage's
        was timed."""
        halves = [s.split_shares for s in self.stages]
        return tuple(at_least_whole(h[0], h[1]) for h in halves) if all(len(h) == 2 for h in halves) else ()


@dataclass(frozen=True)
class Plan:
    """Stages of both models, devices, costs, the schedule and its simulated period.

    Times per batch (``loads_ms``, ``lower_bound_ms``, ``baselines``) count every view.

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
    loads_ms: tuple[float, ...]  # per device, per batch: its work and its transfers
    memory_bytes: tuple[float, ...]  # per device estimate
    lower_bound_ms: float  # all the work spread perfectly over the devices, no communication
    baselines: tuple[tuple[str, float], ...]  # (policy, its busiest device's load under this cost model)
    schedule: str = "tspipe"  # the schedule the cuts were polished for and the trainer runs
    views: int = 1  # inputs per sample (two-view SSL: 2)
    staleness: int = 1  # momentum: batch b's teacher sees the EMA after step b-1-staleness
    loss: str = "batch"  # the loss granularity (tspipe_fx.schedule.task.LOSSES)
    # per device, the link to the next one: (GB/s, latency ms); empty: transfers are free
    links: tuple[tuple[float, float], ...] = ()
    teacher_parts: int = 1  # teacher micro-batches per student micro-batch (schedule "auto")
    precision: str = "fp32"  # the compute dtype the costs price (activations, links) and the trainer runs
    recompute: tuple[str, ...] = ()  # per device, its activation recompute policy (empty: "never")
    memory: tuple[StageMemory, ...] = ()  # per device, the predicted peak by part (memory_bytes: its total)
    # virtual stages (schedule "auto"): stage j runs on device j % (n_stages // stages_per_device);
    # the fields "per device" above are then per stage
    stages_per_device: int = 1

    def __post_init__(self) -> None:
        _check(self)

    @property
    def n_stages(self) -> int:
        return len(self.devices)

    @property
    def n_devices(self) -> int:
        return self.n_stages // self.stages_per_device

    @property
    def max_load_ms(self) -> float:
        """The partition's objective: the busiest device's work and transfers per batch."""
        n = self.n_devices
        return max(sum(self.loads_ms[d::n]) for d in range(n))

    @property
    def busiest_ms(self) -> float:
        """The busiest device's compute per batch (transfers overlap it): no schedule is faster."""
        return max(self.stage_costs().loads_ms(self.micro_batches, self.views, self.stages_per_device))

    @property
    def period_ms(self) -> float:
        """The simulated time per batch of the plan's schedule in steady state."""
        return simulate_plan(self).period

    @property
    def efficiency(self) -> float:
        """The physical limit (all work spread evenly) over the period: 1.0 leaves no device idle."""
        period = self.period_ms  # (one simulation)
        return self.lower_bound_ms / period if period > 0 else 1.0

    @property
    def imbalance(self) -> float:
        """How far the busiest device's load is above the ideal lower bound (0.05 = 5%)."""
        return self.max_load_ms / self.lower_bound_ms - 1 if self.lower_bound_ms > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        """Samples per second at the simulated period."""
        period = self.period_ms
        return self.batch_size / period * 1e3 if period > 0 else float("inf")

    def stage_costs(self, link: tuple[float, float] | None = None, scale: float = 1.0) -> StageCosts:
        """Per stage, one micro-batch's task times (a recomputing stage's backward replays its
        forward); transfers over the plan's links, or over ``link`` (GB/s, latency µs) between
        every pair of devices."""
        pairs = list(zip(self.student.stages, self.teacher.stages, strict=True))
        links = [(link[0], link[1] / 1e3)] * self.n_stages if link is not None else list(self.links)

        def send(j: int, nbytes: int) -> float:
            return transfer_ms(nbytes * scale, *links[j]) if links and j < self.n_stages - 1 else 0.0

        replay = [replay_share(r, self.micro_batches) for r in self.recompute] or [0.0] * self.n_stages
        return StageCosts(
            tuple(s.fwd_ms * scale for s, _ in pairs),
            tuple(
                (s.bwd_ms + r * s.fwd_ms) * scale for (s, _), r in zip(pairs, replay, strict=True)
            ),  # + recompute
            tuple(t.fwd_ms * scale for _, t in pairs),
            tuple(send(j, s.cut_out_bytes) for j, (s, _) in enumerate(pairs)),
            tuple(send(j, t.cut_out_bytes) for j, (_, t) in enumerate(pairs)),
            split_shares=self.student.timed_split(),
        )

    def build_schedule(self, n_batches: int = 4, *, costs: StageCosts | None = None) -> Schedule:
        """The plan's schedule over ``n_batches`` batches (``auto``: made for the plan's costs)."""
        return make_schedule(self.schedule, self.n_stages, self.micro_batches, views=self.views,
                             mode=self.mode, staleness=self.staleness, n_batches=n_batches, loss=self.loss,
                             costs=costs or self.stage_costs(), teacher_parts=self.teacher_parts,
                             stages_per_device=self.stages_per_device)  # fmt: skip

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["format_version"] = FORMAT_VERSION
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
            version = data.pop("format_version", None)
            if version not in (1, 2, FORMAT_VERSION):
                raise ValueError(f"format_version is not 1, 2 or {FORMAT_VERSION}")
            if version == 1:  # tuned for one view; simulated with BYOL's two in momentum mode
                data.update(schedule="tspipe", views=2 if data.get("mode") == "momentum" else 1, staleness=1)
            if version in (1, 2):  # times were per view
                views = data["views"]
                data["loads_ms"] = [x * views for x in data["loads_ms"]]
                data["lower_bound_ms"] *= views
                data["baselines"] = [[name, x * views] for name, x in data["baselines"]]
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
    if plan.loss not in LOSSES:
        raise bad("loss", f"one of {list(LOSSES)}")
    if not count(plan.teacher_parts, 1) or (plan.teacher_parts > 1 and plan.schedule != "auto"):
        raise bad("teacher_parts", "an integer >= 1 (above 1 with schedule 'auto' only)")
    if plan.precision not in PRECISIONS:
        raise bad("precision", f"one of {list(PRECISIONS)}")
    if plan.links and (
        len(plan.links) != len(plan.devices)
        or not all(len(x) == 2 and x[0] > 0 and x[1] >= 0 for x in plan.links)
    ):
        raise bad("links", f"{len(plan.devices)} pairs (GB/s > 0, latency ms >= 0), or empty")
    v = plan.stages_per_device
    if not count(v, 1) or len(plan.devices) % v or (v > 1 and plan.schedule != "auto"):
        raise bad(
            "stages_per_device",
            f"an integer >= 1 dividing the {len(plan.devices)} stages (above 1 with schedule 'auto' only)",
        )
    if v > 1 and any(plan.devices[j] != plan.devices[j % plan.n_devices] for j in range(len(plan.devices))):
        raise bad("devices", f"stage j's device the same as stage j % {plan.n_devices}'s (virtual stages)")
    n = plan.n_stages
    if plan.recompute and (len(plan.recompute) != n or not all(r in RECOMPUTE for r in plan.recompute)):
        raise bad("recompute", f"{n} policies of {list(RECOMPUTE)} (one per device), or empty")
    if plan.memory and (len(plan.memory) != n or not all(isinstance(m, StageMemory) for m in plan.memory)):
        raise bad("memory", f"{n} predicted peaks (one per device), or empty")
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
    d["memory"] = tuple(StageMemory(**m) for m in d.get("memory", ()))
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
        schedule: ``auto``, ``tspipe``, ``gpipe``, ``1f1b`` or ``sequential`` (default: the
            plan's). ``sequential`` (inter-layer model parallelism, one micro-batch per batch)
            runs each stage on the whole batch, costed as the plan's micro-batch costs times its
            ``micro_batches`` (linear in the batch: a GPU's better efficiency on larger batches
            is not counted).
        views: 1 or 2 (default: the plan's).
        link: ``(GB/s, latency µs)`` per transfer between neighbouring devices
            (:data:`tspipe_fx.cost.devices.LINKS`); None: the plan's links.

    Example:
        >>> simulate_plan(pipe.plan, "tspipe").period / simulate_plan(pipe.plan, "gpipe").period
    """
    name = schedule if schedule is not None else plan.schedule
    costs = plan.stage_costs(link, scale=plan.micro_batches if name == "sequential" else 1)
    parts = plan.teacher_parts if name == "auto" else 1
    as_run = dataclasses.replace(plan, schedule=name, views=views or plan.views, teacher_parts=parts)
    s = as_run.build_schedule(n_batches, costs=costs)
    return simulate_costs(s, costs)
