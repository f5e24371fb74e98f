"""``tspipe_fx.compile``: capture, cost, partition and split a student and a teacher.

student, teacher, example batch
  -> capture both                    (tspipe_fx.capture)
  -> structure + symbolic passes     (tspipe_fx.passes)
  -> per-node costs                  (a CostModel; by default measured on the first device)
  -> chains with candidate cuts      (tspipe_fx.chain)
  -> exact min-max partition         (tspipe_fx.partition)
  -> polished for the schedule       (tspipe_fx.refine: shortest simulated period nearby)
  [-> stages timed whole, costs rescaled, partitioned again  (tspipe_fx.refine; refine=N)]
  -> stage GraphModules              (tspipe_fx.split)
  -> Plan + Pipeline                 (tspipe_fx.plan)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from tspipe_fx.capture import CapturedModel, capture
from tspipe_fx.chain import GraphChain, graph_chain, mirror_map, mirrored_cuts
from tspipe_fx.cost_model import CostModel, MeasuredCost, NodeCost, ParamCountCost, RooflineCost, UniformCost
from tspipe_fx.devices import DEVICE_SPECS, DeviceSpec, device_spec
from tspipe_fx.errors import TspipeError
from tspipe_fx.meta import info
from tspipe_fx.partition import Device, Partition, PartitionError, Problem, evaluate, solve
from tspipe_fx.passes import annotate_structure, annotate_symbolic
from tspipe_fx.passes.symbolic import costs_at, input_sizes
from tspipe_fx.passes.symbolic import evaluate as eval_expr
from tspipe_fx.plan import ModelPlan, Plan, StagePlan
from tspipe_fx.profiling import Profile, graph_fingerprint, profile
from tspipe_fx.refine import at_batch, polish, time_stages
from tspipe_fx.schedule import make_schedule
from tspipe_fx.split import Stage, split, tie_groups

__all__ = ["Pipeline", "compile"]

Mode = Literal["kd", "momentum"]
Cuts = tuple[list[int], list[int]]  # student and teacher chain positions
Balance = Sequence[int] | Sequence[str]


@dataclass
class Pipeline:
    """A compiled teacher-student pipeline: the plan and one stage module per device and model."""

    plan: Plan
    student: CapturedModel
    teacher: CapturedModel
    student_io: list[Stage]
    teacher_io: list[Stage]
    student_chain: GraphChain  # the graphs as the partitioner saw them
    teacher_chain: GraphChain
    student_costs: list[NodeCost]  # per graph node, per micro-batch
    teacher_costs: list[NodeCost]
    hardware: tuple[Device, ...]
    optimizer_factor: float = 2.0
    student_module: nn.Module | None = None  # the user's modules: trained weights come home here
    teacher_module: nn.Module | None = None

    @property
    def student_stages(self) -> list[fx.GraphModule]:
        return [s.module for s in self.student_io]

    @property
    def teacher_stages(self) -> list[fx.GraphModule]:
        return [s.module for s in self.teacher_io]

    def score(self, student_cuts: Sequence[int], teacher_cuts: Sequence[int]) -> Partition:
        """The plan's cost model applied to any cut positions (chain positions, any node).

        Example:
            >>> pipe.score([40], [100]).period_ms  # what a hand-written balance would cost
        """
        problem = Problem(
            student=self.student_chain.to_partition_chain(self.student_costs, student_cuts),
            teacher=self.teacher_chain.to_partition_chain(self.teacher_costs, teacher_cuts),
            devices=self.hardware,
            micro_batches=self.plan.micro_batches,
            optimizer_factor=self.optimizer_factor,
        )
        return evaluate(problem, student_cuts, teacher_cuts)

    def with_plan(self, plan: Plan) -> Pipeline:
        """This pipeline cut as ``plan`` says (another process's plan for the same models: the
        distributed runtime makes every rank follow rank 0's)."""
        _check_plan(plan, self.student, self.teacher, self.plan.n_stages)
        s_cuts = [self.student_chain.position_of(name) for name in plan.student.cuts]
        t_cuts = [self.teacher_chain.position_of(name) for name in plan.teacher.cuts]
        return dataclasses.replace(
            self,
            plan=plan,
            student_io=split(self.student_chain, s_cuts, name=f"{self.student.model_name}Stage"),
            teacher_io=split(self.teacher_chain, t_cuts, name=f"{self.teacher.model_name}Stage"),
        )

    def trainer(self, loss_fn: Any, *, optimizer: Any, **options: Any) -> Any:
        """A :class:`~tspipe_fx.trainer.Trainer` for this pipeline (see its options)."""
        from tspipe_fx.trainer import Trainer

        return Trainer(self, loss_fn, optimizer=optimizer, **options)

    def report(self) -> str:
        """The partition tables (see :func:`tspipe_fx.report.render_plan`)."""
        from tspipe_fx.report import render_plan

        return render_plan(self.plan)


def compile(
    student: nn.Module,
    teacher: nn.Module,
    n_gpus: int,
    *,
    example_inputs: Sequence[Any] | torch.Tensor,
    example_kwargs: dict[str, Any] | None = None,
    mode: Mode = "kd",
    micro_batches: int | None = None,
    batch_size: int | None = None,
    cost_model: CostModel | str | tuple[CostModel, CostModel] | None = None,
    profile: tuple[Profile, Profile] | None = None,
    devices: Sequence[str | torch.device] | None = None,
    device_specs: Sequence[str | DeviceSpec] | None = None,
    memory_limit: int | Sequence[int] | None = None,
    balance: Balance | tuple[Balance, Balance] | None = None,
    optimizer_factor: float = 2.0,
    max_candidates: int = 128,
    plan: Plan | None = None,
    refine: int = 0,
    schedule: str | None = "tspipe",
) -> Pipeline:
    """Cut ``student`` and ``teacher`` into ``n_gpus`` balanced stage pairs.

    Args:
        student: the trained network (an ``nn.Module`` or a :class:`CapturedModel`).
        teacher: the frozen (``mode="kd"``) or EMA (``mode="momentum"``) network.
        n_gpus: pipeline stages, one student and one teacher stage per device.
        example_inputs: one training batch (positional arguments), the same for both models.
        example_kwargs: keyword arguments of that batch.
        mode: ``"kd"`` cuts both models independently, balanced jointly; ``"momentum"`` mirrors
            the student's cuts in the teacher (matched by parameter name).
        micro_batches: micro-batches per batch (default ``n_gpus``); costs are per micro-batch.
        batch_size: the training batch, if larger than the example's (capture and profile a small
            batch, plan for the real one: costs scale through the symbolic FLOPs and bytes).
        cost_model: a CostModel for both, a (student, teacher) pair, or "measured",
            "roofline", "params", "uniform". Default: measured on the first device, or the
            profiles given.
        profile: (student, teacher) profiles to cost with, instead of measuring now.
        devices: where stage ``j`` runs (default ``cuda:0..`` when there are enough GPUs, else
            ``cpu``).
        device_specs: per-device specs for heterogeneous devices: relative speed (the costs are
            taken to be on the first spec's device), memory, links.
        memory_limit: bytes per device (one number or one per device); overrides the specs.
        balance: manual partition: nodes per stage (``[30, 55]``) or split points by module
            name (``["layer3"]``); a ``(student, teacher)`` pair in KD mode.
        optimizer_factor: optimizer state per parameter byte (Adam 2, SGD with momentum 1).
        max_candidates: candidate cuts per model (the partitioner's granularity).
        plan: a saved :class:`Plan` to rebuild instead of partitioning.
        refine: rounds of checking the plan against its stages run whole on the first device
            (:func:`tspipe_fx.refine.time_stages`): each round times the chosen stages, scales
            each stage's node costs to its measured times and partitions again, until the cuts
            repeat; the partition whose measured loads are the most even is kept. With fixed cuts
            (``plan``, ``balance``) one round corrects the reported costs. 0: off.
        schedule: the schedule the plan is for (``"tspipe"``, ``"gpipe"``, ``"1f1b"``): from the
            min-max optimum, the partitioner moves to neighbouring cuts while the simulated
            period of that schedule gets shorter (:func:`tspipe_fx.refine.polish`). None: the
            min-max optimum as it is.

    Example:
        >>> pipe = tspipe_fx.compile(resnet18, vit_b16, 4, example_inputs=(x,))
        >>> print(pipe.report())
    """
    n, mode = _check_args(student, teacher, n_gpus, mode, micro_batches, max_candidates)
    if schedule not in (None, "tspipe", "gpipe", "1f1b"):
        raise TspipeError(
            f"schedule must be 'tspipe', 'gpipe', '1f1b' or None (the plan's min-max optimum as it "
            f"is), got {schedule!r}"
        )
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise TspipeError(f"refine must be an integer >= 0 (rounds of stage timing), got {refine!r}")
    run_on = _resolve_devices(devices, n)
    s_cap = _capture(student, example_inputs, example_kwargs, "student")
    t_cap = _capture(teacher, example_inputs, example_kwargs, "teacher")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    s_flat = s_cap.flatten_inputs(args, example_kwargs or {})
    t_flat = t_cap.flatten_inputs(args, example_kwargs or {})
    sizes = input_sizes(s_flat)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise TspipeError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batch = batch_size or sizes.get("B", 1)
    m = micro_batches if micro_batches is not None else n
    if batch < m:
        raise TspipeError(
            f"the batch has {batch} samples, fewer than micro_batches={m}; hint: a larger batch "
            "(batch_size=...), or fewer micro-batches"
        )
    if mode == "momentum":
        _check_momentum_names(s_cap, t_cap)
    micro = {**sizes, "B": math.ceil(batch / m)}
    for cap, flat in ((s_cap, s_flat), (t_cap, t_flat)):
        annotate_structure(cap.graph_module)
        annotate_symbolic(cap.graph_module, flat)
    specs = (
        [device_spec(s) for s in device_specs] if device_specs is not None else [_spec_for(d) for d in run_on]
    )
    hw = _hardware(run_on, specs, device_specs is not None, memory_limit)
    s_gc = graph_chain(s_cap.graph_module, micro, max_candidates=max_candidates)
    t_gc = graph_chain(t_cap.graph_module, micro, max_candidates=max_candidates)

    # Every check that needs only the graphs comes before the costs (which may mean profiling).
    fixed: tuple[list[int], list[int]] | None = None
    pairs: list[tuple[int, int]] = []
    if plan is not None:
        _check_plan(plan, s_cap, t_cap, n)
        fixed = (
            [s_gc.position_of(name) for name in plan.student.cuts],
            [t_gc.position_of(name) for name in plan.teacher.cuts],
        )
    elif balance is not None:
        fixed = _manual_cuts(balance, s_gc, t_gc, n, mode, s_cap, t_cap)
    elif mode == "momentum":
        pairs = mirrored_cuts(s_gc, t_gc, _shared_names(s_cap, t_cap))
        if len(pairs) < n - 1:
            raise PartitionError(
                f"the momentum pair has {len(pairs)} cut positions that split the student and the "
                f"teacher alike: too few for {n} stages; hint: use fewer devices"
            )
    else:
        for role, gc in (("student", s_gc), ("teacher", t_gc)):
            if len(gc.candidates) < n - 1:
                raise PartitionError(
                    f"the {role} graph has {len(gc.candidates)} candidate cuts: too few for {n} stages; "
                    "hint: use fewer devices, or allow more cut positions (max_candidates)"
                )

    s_cm, t_cm, cm_name = _cost_models(
        cost_model, profile, s_cap, t_cap, (args, example_kwargs or {}), run_on[0], specs[0]
    )
    with costs_at((s_cap.graph_module, t_cap.graph_module), micro):  # every cost is for one micro-batch
        s_costs = s_cm.graph_costs(s_cap.graph_module)
        t_costs = t_cm.graph_costs(t_cap.graph_module)

    def problem(s_cuts: Sequence[int] | None = None, t_cuts: Sequence[int] | None = None, *, mirror: bool = False,
                sc: Sequence[NodeCost] = s_costs, tc: Sequence[NodeCost] = t_costs) -> Problem:  # fmt: skip
        return Problem(
            student=s_gc.to_partition_chain(sc, s_cuts),
            teacher=t_gc.to_partition_chain(tc, t_cuts),
            devices=hw,
            micro_batches=m,
            optimizer_factor=optimizer_factor,
            mirror=mirror,
        )

    def partition(sc: Sequence[NodeCost], tc: Sequence[NodeCost], at: Cuts | None = None) -> Partition:
        """The best partition on costs ``sc``/``tc``, or the one at cuts ``at`` scored on them."""
        cuts = at if at is not None else fixed
        if cuts is not None:
            return evaluate(problem(*cuts, sc=sc, tc=tc), *cuts)
        if mode == "momentum":
            prob = problem([p for p, _ in pairs], [q for _, q in pairs], mirror=True, sc=sc, tc=tc)
        else:
            prob = problem(sc=sc, tc=tc)
        best = solve(prob)
        return polish(prob, best, tuned_for) if tuned_for is not None else best

    tuned_for = (
        make_schedule(schedule, n, m, mode=mode, n_batches=4) if schedule is not None and n > 1 else None
    )

    part = partition(s_costs, t_costs)
    if refine:
        example_batch = sizes.get("B", 1)
        if micro["B"] != example_batch and not (s_cap.dynamic_batch and t_cap.dynamic_batch):
            raise TspipeError(
                f"refine runs the stages on one micro-batch of {micro['B']} samples, but a model was "
                f"captured for {example_batch} only; hint: example_inputs of {micro['B']} samples"
            )
        inputs = (at_batch(s_flat, example_batch, micro["B"]), at_batch(t_flat, example_batch, micro["B"]))
        part, s_costs, t_costs = _refine(
            part, partition, refine, fixed is not None, (s_gc, t_gc), (s_costs, t_costs), inputs, run_on[0]
        )
        cm_name += "+refined"
    baselines = (
        _baselines(problem, s_gc, t_gc, pairs if mode == "momentum" else None) if fixed is None else ()
    )

    s_stages = split(s_gc, part.student_cuts, name=f"{s_cap.model_name}Stage")
    t_stages = split(t_gc, part.teacher_cuts, name=f"{t_cap.model_name}Stage")
    total_work = sum(c.fwd_ms + c.bwd_ms for c in s_costs) + sum(c.fwd_ms for c in t_costs)
    result = Plan(
        mode=mode,
        devices=tuple(str(d) for d in run_on),
        batch_size=batch,
        micro_batches=m,
        cost_model=cm_name,
        student=_model_plan(s_cap, s_gc, s_stages, part.student_cuts, s_costs, run_on, micro),
        teacher=_model_plan(t_cap, t_gc, t_stages, part.teacher_cuts, t_costs, run_on, micro),
        loads_ms=tuple(float(x) for x in part.loads_ms),
        memory_bytes=tuple(float(x) for x in part.memory_bytes),
        lower_bound_ms=m * total_work / sum(d.speed for d in hw),
        baselines=baselines,
    )
    return Pipeline(
        result, s_cap, t_cap, s_stages, t_stages, s_gc, t_gc, s_costs, t_costs, hw, optimizer_factor,
        student if not isinstance(student, CapturedModel) else None,
        teacher if not isinstance(teacher, CapturedModel) else None,
    )  # fmt: skip


def _refine(
    part: Partition,
    partition: Callable[..., Partition],
    rounds: int,
    fixed: bool,
    chains: tuple[GraphChain, GraphChain],
    costs: tuple[list[NodeCost], list[NodeCost]],
    inputs: tuple[list[Any], list[Any]],
    device: torch.device,
) -> tuple[Partition, list[NodeCost], list[NodeCost]]:
    """Time the partition's stages whole, rescale their nodes, partition again (see ``refine``)."""
    (s_gc, t_gc), (s_costs, t_costs) = chains, costs
    measured: list[Partition] = []
    for _ in range(rounds):
        times = time_stages(split(s_gc, part.student_cuts), split(t_gc, part.teacher_cuts), *inputs, device)
        s_pred = s_gc.to_partition_chain(s_costs)
        t_pred = t_gc.to_partition_chain(t_costs)
        s_fwd, s_bwd = (
            _stage_sums(s_pred.fwd_ms, part.student_cuts),
            _stage_sums(s_pred.bwd_ms, part.student_cuts),
        )
        t_fwd = _stage_sums(t_pred.fwd_ms, part.teacher_cuts)
        s_costs = s_gc.rescaled(
            s_costs,
            part.student_cuts,
            _ratios(times.student_fwd_ms, s_fwd),
            _ratios(times.student_bwd_ms, s_bwd),
        )
        t_costs = t_gc.rescaled(
            t_costs, part.teacher_cuts, _ratios(times.teacher_fwd_ms, t_fwd), [1.0] * len(t_fwd)
        )
        # On the rescaled costs, this partition's compute is what was measured.
        measured.append(partition(s_costs, t_costs, at=_cuts(part)))
        if fixed:
            break
        again = partition(s_costs, t_costs)
        if any(_cuts(again) == _cuts(p) for p in measured):
            break
        part = again
    # Rounds run at different times, and a noisy machine's speed drifts between them; within a
    # round every stage saw the same machine, so partitions compare by their measured imbalance.
    best = min(measured, key=lambda p: p.period_ms * len(p.loads_ms) / sum(p.loads_ms))
    return partition(s_costs, t_costs, at=_cuts(best)), s_costs, t_costs


def _cuts(part: Partition) -> Cuts:
    return list(part.student_cuts), list(part.teacher_cuts)


def _stage_sums(values: Sequence[float], cuts: Sequence[int]) -> list[float]:
    bounds = [0, *cuts, len(values)]
    return [float(sum(values[a:b])) for a, b in itertools.pairwise(bounds)]


def _ratios(measured: Sequence[float], predicted: Sequence[float]) -> list[float]:
    """Per stage: measured over predicted (1 where nothing was predicted)."""
    return [mv / pv if pv > 0 else 1.0 for mv, pv in zip(measured, predicted, strict=True)]


# --- arguments -------------------------------------------------------------------------------


def _check_args(
    student: Any, teacher: Any, n_gpus: Any, mode: str, micro_batches: int | None, max_candidates: int
) -> tuple[int, Mode]:
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise TspipeError(f"the {role} must be an nn.Module, got {type(model).__name__}")
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 1:
        raise TspipeError(f"n_gpus must be an integer >= 1, got {n_gpus!r}")
    if mode not in ("kd", "momentum"):
        raise TspipeError(f"mode must be 'kd' or 'momentum', got {mode!r}")
    if micro_batches is not None and (not isinstance(micro_batches, int) or micro_batches < 1):
        raise TspipeError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    if max_candidates < 1:
        raise TspipeError(f"max_candidates must be >= 1, got {max_candidates}")
    return n_gpus, mode  # type: ignore[return-value]


def _capture(model: nn.Module, inputs: Any, kwargs: dict[str, Any] | None, role: str) -> CapturedModel:
    if isinstance(model, CapturedModel):
        return model
    return capture(model, inputs, example_kwargs=kwargs)


def _resolve_devices(devices: Sequence[str | torch.device] | None, n: int) -> list[torch.device]:
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


def _spec_for(dev: torch.device) -> DeviceSpec:
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev).lower()
        for key in ("h100", "a100", "v100"):
            if key in name:
                return DEVICE_SPECS[key]
    return DEVICE_SPECS["cpu"]


def _hardware(
    run_on: Sequence[torch.device],
    resolved: Sequence[DeviceSpec],
    given: bool,
    memory_limit: int | Sequence[int] | None,
) -> tuple[Device, ...]:
    """The partitioner's devices: speeds relative to the first spec, memory, links."""
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
        )
        for s, lim in zip(resolved, limits, strict=True)
    )


def _cost_models(
    cost_model: CostModel | str | tuple[CostModel, CostModel] | None,
    profiles: tuple[Profile, Profile] | None,
    s_cap: CapturedModel,
    t_cap: CapturedModel,
    example: tuple[tuple[Any, ...], dict[str, Any]],
    device: torch.device,
    spec: DeviceSpec,
) -> tuple[CostModel, CostModel, str]:
    if isinstance(cost_model, tuple):
        if len(cost_model) != 2 or not all(isinstance(c, CostModel) for c in cost_model):
            raise TspipeError("cost_model as a tuple must be (student CostModel, teacher CostModel)")
        return cost_model[0], cost_model[1], f"{cost_model[0].name}/{cost_model[1].name}"
    if isinstance(cost_model, CostModel):
        return cost_model, cost_model, cost_model.name
    if cost_model in ("roofline", "params", "uniform"):
        builtin = {"roofline": lambda: RooflineCost(spec),
                   "params": ParamCountCost, "uniform": UniformCost}[cost_model]  # fmt: skip
        return builtin(), builtin(), str(cost_model)
    if cost_model not in (None, "measured", "calibrated"):
        raise TspipeError(
            f"unknown cost_model {cost_model!r}; use a CostModel, a (student, teacher) pair, or one of "
            "'measured', 'calibrated', 'roofline', 'params', 'uniform'"
        )
    if profiles is None:  # both models measured on the example batch, called as the user calls them
        args, kwargs = example
        profiles = (
            profile(s_cap, args, example_kwargs=kwargs, device=device, repeats=3),
            profile(t_cap, args, example_kwargs=kwargs, device=device, repeats=3),
        )
    if len(profiles) != 2 or not all(isinstance(p, Profile) for p in profiles):
        raise TspipeError("profile must be a (student Profile, teacher Profile) pair")
    calibrate = cost_model == "calibrated"  # node times scaled to the whole models' measured totals
    return (
        MeasuredCost(profiles[0], calibrate=calibrate),
        MeasuredCost(profiles[1], calibrate=calibrate),
        "calibrated" if calibrate else "measured",
    )


def _shared_names(s_cap: CapturedModel, t_cap: CapturedModel) -> set[str]:
    return set(dict(t_cap.graph_module.named_parameters())) & set(dict(s_cap.graph_module.named_parameters()))


def _check_momentum_names(s_cap: CapturedModel, t_cap: CapturedModel) -> None:
    s_params = dict(s_cap.graph_module.named_parameters())
    t_params = dict(t_cap.graph_module.named_parameters())
    missing = sorted(set(t_params) - set(s_params))
    if missing:
        raise TspipeError(
            f"momentum teacher parameters without a student parameter of the same name: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)} of {len(t_params)}); hint: the teacher "
            "must be a copy of (part of) the student, e.g. copy.deepcopy(student.backbone)"
        )
    shapes = [
        f"{k}: student {tuple(s_params[k].shape)}, teacher {tuple(v.shape)}"
        for k, v in t_params.items()
        if s_params[k].shape != v.shape
    ]
    if shapes:
        raise TspipeError(f"momentum teacher parameters whose shapes differ from the student's: {shapes[:5]}")


def _manual_cuts(
    balance: Any,
    s_gc: GraphChain,
    t_gc: GraphChain,
    n: int,
    mode: str,
    s_cap: CapturedModel,
    t_cap: CapturedModel,
) -> tuple[list[int], list[int]]:
    is_pair = (
        isinstance(balance, tuple)
        and len(balance) == 2
        and all(isinstance(b, (list, tuple)) for b in balance)
    )
    s_bal, t_bal = balance if is_pair else (balance, None)
    s_cuts = _cuts_from_balance(s_bal, s_gc, n, "student")
    if t_bal is not None:
        t_cuts = _cuts_from_balance(t_bal, t_gc, n, "teacher")
    elif mode == "momentum":
        pairs = mirror_map(s_gc, t_gc, _shared_names(s_cap, t_cap), s_cuts)
        off = [p for p in s_cuts if p not in pairs]
        if off:
            ok = mirrored_cuts(s_gc, t_gc, _shared_names(s_cap, t_cap))
            raise TspipeError(
                f"student cuts at {[s_gc.nodes[p].name for p in off]} split parameters the teacher cannot "
                f"mirror; mirrorable cut nodes: {[s_gc.nodes[p].name for p, _ in ok][:20]}"
            )
        t_cuts = [pairs[p] for p in s_cuts]
    else:
        raise TspipeError("in KD mode balance must be a (student, teacher) pair of balances")
    return s_cuts, t_cuts


def _cuts_from_balance(bal: Any, gc: GraphChain, n: int, role: str) -> list[int]:
    if not isinstance(bal, (list, tuple)) or not bal:
        raise TspipeError(f"{role} balance must be a list of node counts or module names, got {bal!r}")
    if all(isinstance(b, str) for b in bal):
        if len(bal) != n - 1:
            raise TspipeError(f"{role}: {n} stages need {n - 1} split points, got {len(bal)}: {list(bal)}")
        cuts = [gc.module_position(b) for b in bal]
    elif all(isinstance(b, int) and not isinstance(b, bool) for b in bal):
        if len(bal) != n or any(b < 1 for b in bal):
            raise TspipeError(f"{role}: balance needs {n} positive node counts, got {list(bal)}")
        if sum(bal) != gc.n:
            raise TspipeError(
                f"{role} balance {list(bal)} sums to {sum(bal)}, but the graph has {gc.n} compute nodes; "
                "hint: counts of call_module/call_function/call_method nodes per stage"
            )
        cuts = [sum(bal[: k + 1]) for k in range(n - 1)]
    else:
        raise TspipeError(f"{role} balance mixes node counts and module names: {list(bal)}")
    if any(b <= a for a, b in zip([0, *cuts], [*cuts, gc.n], strict=True)):
        raise TspipeError(
            f"{role} split points must be in graph order and leave no stage empty, got {list(bal)}"
        )
    return cuts


def _check_plan(plan: Plan, s_cap: CapturedModel, t_cap: CapturedModel, n: int) -> None:
    if not isinstance(plan, Plan):
        raise TspipeError(f"plan must be a Plan, got {type(plan).__name__}")
    if plan.n_stages != n:
        raise TspipeError(f"the plan has {plan.n_stages} stages, n_gpus is {n}")
    for role, cap, mp in (("student", s_cap, plan.student), ("teacher", t_cap, plan.teacher)):
        if graph_fingerprint(cap.graph_module) != mp.graph_hash:
            raise TspipeError(
                f"the plan's {role} ({mp.model_name}, graph {mp.graph_hash}) is not this {role}'s graph "
                f"({graph_fingerprint(cap.graph_module)}); hint: compile the plan anew"
            )


# --- plan assembly ---------------------------------------------------------------------------


def _baselines(
    problem: Any, s_gc: GraphChain, t_gc: GraphChain, pairs: list[tuple[int, int]] | None
) -> tuple[tuple[str, float], ...]:
    """The period of simple policies' partitions under our cost model (what the model bought).

    Each policy balances its own proxy cost (node count, parameter bytes) and knows nothing of
    links or memory, as in the libraries that use it; its cuts are then scored like ours.
    """
    out = []
    for name, policy in (("equal nodes", UniformCost()), ("equal parameters", ParamCountCost())):
        sc, tc = policy.graph_costs(s_gc.gm), policy.graph_costs(t_gc.gm)
        if pairs is not None:  # momentum: the same mirrored cut pairs as ours
            base = problem([p for p, _ in pairs], [q for _, q in pairs], mirror=True, sc=sc, tc=tc)
        else:
            base = problem(sc=sc, tc=tc)
        blind = dataclasses.replace(base, devices=tuple(Device() for _ in base.devices))
        try:
            cuts = solve(blind)
        except PartitionError:
            continue
        scored = problem(list(cuts.student_cuts), list(cuts.teacher_cuts))
        out.append((name, float(evaluate(scored, cuts.student_cuts, cuts.teacher_cuts).period_ms)))
    return tuple(out)


def _model_plan(
    cap: CapturedModel,
    gc: GraphChain,
    stages: list[Stage],
    cuts: Sequence[int],
    costs: Sequence[NodeCost],
    run_on: Sequence[torch.device],
    micro: dict[str, int],
) -> ModelPlan:
    chain_costs = gc.costs(costs)
    params = gc.param_bytes()
    bounds = [0, *cuts, gc.n]
    plans = []
    for k, stage in enumerate(stages):
        lo, hi = bounds[k], bounds[k + 1]
        nodes = gc.nodes[lo:hi]
        plans.append(
            StagePlan(
                index=k,
                device=str(run_on[k]),
                nodes=stage.nodes,
                inputs=stage.inputs,
                outputs=stage.outputs,
                first_module=info(nodes[0]).module_path,
                last_module=info(nodes[-1]).module_path,
                param_bytes=sum(params[lo:hi]),
                fwd_flops=sum(eval_expr(info(node).flops_expr, micro) for node in nodes),
                fwd_ms=sum(c.fwd_ms for c in chain_costs[lo:hi]),
                bwd_ms=sum(c.bwd_ms for c in chain_costs[lo:hi]),
                activation_bytes=sum(c.memory_bytes for c in chain_costs[lo:hi]),
                cut_in_bytes=gc.live_bytes[lo] if k > 0 else 0,
                cut_out_bytes=gc.live_bytes[hi] if k < len(stages) - 1 else 0,
            )
        )
    return ModelPlan(
        model_name=cap.model_name,
        method=cap.method,
        graph_hash=graph_fingerprint(cap.graph_module),
        cuts=tuple(gc.nodes[p].name for p in cuts),
        stages=tuple(plans),
        tie_groups=tuple(tie_groups(stages)),
    )
