"""``tspipe_fx.compile``: capture, cost, partition and split a student and a teacher.

student, teacher, example batch
  -> capture both                    (tspipe_fx.tracing)
  -> structure + symbolic passes     (tspipe_fx.passes), once per model
  -> chains with candidate cuts      (tspipe_fx.passes.chain)
  -> per-node costs                  (a CostModel, for one micro-batch; by default measured)
  -> exact min-max partition         (tspipe_fx.partition)
  -> chosen for the schedule         (tspipe_fx.partition.balance: student-capped partitions, the
                                      shortest simulated period; a fixed schedule's polished nearby)
  [-> stages timed whole, costs rescaled, partitioned again  (tspipe_fx.compiler.refine; refine=N)]
  -> stage GraphModules              (tspipe_fx.passes.split)
  -> Plan + Pipeline                 (tspipe_fx.plan, tspipe_fx.pipeline)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tspipe_fx.compiler.assemble import model_plan
from tspipe_fx.compiler.capture import captured, check_shapes
from tspipe_fx.compiler.checks import Mode, check_args, check_options, from_plan
from tspipe_fx.compiler.costs import cost_models
from tspipe_fx.compiler.cuts import check_momentum_names, cut_space
from tspipe_fx.compiler.hardware import hardware, resolve_devices, spec_for
from tspipe_fx.compiler.memory import ScheduleOf, fit_memory, predicted
from tspipe_fx.compiler.micro_batches import Partitioned, candidates, fastest, measured_at, scaled
from tspipe_fx.compiler.partitioner import Partitioner
from tspipe_fx.compiler.refine import refine as refine_step
from tspipe_fx.compiler.saved_costs import keeps_saved_costs, saved_costs
from tspipe_fx.compiler.virtual import check_stages_per_device, interleave
from tspipe_fx.cost.devices import DeviceSpec, device_spec
from tspipe_fx.cost.model import CostModel
from tspipe_fx.cost.profile import Profile
from tspipe_fx.cost.stage_times import at_batch
from tspipe_fx.errors import TspipeError
from tspipe_fx.partition.interleave import per_stage
from tspipe_fx.partition.objective import schedule_costs
from tspipe_fx.partition.problem import Partition, Problem
from tspipe_fx.passes import annotate_structure
from tspipe_fx.passes.chain import GraphChain, graph_chain
from tspipe_fx.passes.split import split
from tspipe_fx.passes.symbolic import input_sizes
from tspipe_fx.pipeline import Pipeline
from tspipe_fx.plan import PRECISIONS, Plan, compute_bytes
from tspipe_fx.schedule.generators import make_schedule
from tspipe_fx.schedule.memory import StageMemory, checked_recompute
from tspipe_fx.schedule.task import Schedule
from tspipe_fx.stage import positional_args
from tspipe_fx.tracing import CapturedModel

__all__ = ["compile"]

Balance = Sequence[int] | Sequence[str]


def compile(
    student: nn.Module,
    teacher: nn.Module,
    n_gpus: int,
    *,
    example_inputs: Sequence[Any] | torch.Tensor,
    example_kwargs: dict[str, Any] | None = None,
    teacher_example_inputs: Sequence[Any] | torch.Tensor | None = None,
    teacher_example_kwargs: dict[str, Any] | None = None,
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
    schedule: str | None = "auto",
    views: int | None = None,
    staleness: int | None = None,
    loss: str | None = None,
    teacher_parts: int | None = None,
    precision: str | None = None,
    recompute: str | None = None,
    stages_per_device: int | str = 1,
) -> Pipeline:
    """Cut ``student`` and ``teacher`` into ``n_gpus`` balanced stage pairs.

    Args:
        student: the trained network (an ``nn.Module`` or a :class:`CapturedModel`).
        teacher: the frozen (``mode="kd"``) or EMA (``mode="momentum"``) network.
        n_gpus: pipeline stages, one student and one teacher stage per device.
        example_inputs: one training batch (positional arguments) of the student (and of the
            teacher, unless it has its own).
        example_kwargs: keyword arguments of that batch.
        teacher_example_inputs, teacher_example_kwargs: the teacher's own inputs for the same
            samples (another tokenizer or resolution); train with ``trainer.step(...,
            teacher_inputs=..., teacher_kwargs=...)``. Default: the student's.
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
        plan: a saved :class:`Plan` to rebuild instead of partitioning: its cuts and, unless given
            here, its micro-batches, batch size, views, staleness, loss, teacher parts (with
            ``schedule="auto"``), precision and recompute policies (the schedule is ``schedule``'s);
            without ``cost_model`` or ``profile``, at its micro-batch size and precision, its stage
            costs too, with no profiling (:mod:`tspipe_fx.compiler.saved_costs`).
        refine: rounds of checking the plan against its stages run whole on the first device
            (:func:`tspipe_fx.cost.stage_times.time_stages`): each round times the chosen stages,
            scales each stage's node costs to its measured times and partitions again, until the
            cuts repeat; the partition whose measured loads are the most even is kept. With fixed
            cuts (``plan``, ``balance``) one round corrects the reported costs. Where compile
            chooses M on profiles, both whole models are first timed at every candidate's
            micro-batch (:mod:`tspipe_fx.cost.micro_scaling`). 0: off.
        schedule: the schedule the plan is for and trains with: ``"auto"`` (default: synthesized
            for the plan's costs, :mod:`tspipe_fx.schedule.synthesis`), ``"tspipe"``, ``"gpipe"``
            or ``"1f1b"``. The min-max partition and those with the student's stages capped
            (:mod:`tspipe_fx.partition.balance`) are simulated under it and the fastest is kept; a
            fixed schedule's is then polished (:func:`tspipe_fx.partition.polisher.polish`).
            None: the min-max optimum as it is (the plan records ``"tspipe"`` to train with).
        views: inputs per sample the plan is for (default: 2 in momentum mode, as BYOL and MoCo v3
            train, else 1); the trainer's default.
        staleness: momentum: 1, the teacher one step late as in TSPipe, or 0 (synchronous).
        loss: what one loss call covers (the trainer's default): ``"batch"`` (the whole batch),
            ``"micro"`` (one micro-batch: a loss that is a mean over samples, such as soft-target
            KD or BYOL; the terms are weighted to add up to the whole-batch loss) or
            ``"micro_full_teacher"`` (one micro-batch of student outputs against the whole batch's
            teacher outputs: InfoNCE of a query micro-batch against every key). A per-micro-batch
            loss lets the student's backward start before the whole batch is forwarded.
        teacher_parts: with ``schedule="auto"``, the teacher runs each student micro-batch as this
            many smaller ones, so that its tasks fit the gaps the student leaves (a teacher in
            train mode gets BatchNorm statistics of those); costed linearly. The trainer's default.
        precision: the compute dtype trained in, ``"fp32"``, ``"bf16"`` or ``"fp16"``: activations
            and the bytes crossing stages are priced in it (half of fp32's), the roofline cost
            model takes its peak, and the trainer runs it unless told otherwise.
        recompute: activation recompute, ``"never"``, ``"always"``, ``"except_last"`` or
            ``"auto"`` (per device, the least recompute that fits its memory; the replayed
            forwards count in its load). Every device's peak is predicted
            (:mod:`tspipe_fx.partition.memory`) and kept within its memory; the plan records it
            and the policies, and the trainer runs them unless told otherwise.
        stages_per_device: 1, or virtual stages for a momentum pair with ``schedule="auto"``: 2
            cuts both models into ``2 * n_gpus`` stages, device ``d`` holding stages ``d`` and
            ``d + n_gpus`` (:mod:`tspipe_fx.compiler.virtual`); ``"auto"`` takes them where the
            synthesized schedule simulates faster. Both runtimes run them; a saved plan keeps its own.

    With ``schedule="auto"`` and no ``micro_batches``, compile also chooses M (N, 2N or 4N) with
    the partition: the one whose synthesized schedule simulates fastest
    (:mod:`tspipe_fx.compiler.micro_batches`).

    Example:
        >>> pipe = tspipe_fx.compile(resnet18, vit_b16, 4, example_inputs=(x,))
        >>> print(pipe.report())
    """
    if plan is not None and not isinstance(plan, Plan):
        raise TspipeError(f"plan must be a tspipe_fx Plan (Plan.load(path)), got {type(plan).__name__}")
    if teacher_parts is None and schedule != "auto":  # (finer teacher tasks are auto's alone)
        teacher_parts = 1
    # As given, else the saved plan's, else the default.
    settings = from_plan(
        plan,
        views=views,
        staleness=staleness,
        loss=loss,
        teacher_parts=teacher_parts,
        precision=precision,
        recompute=recompute,
        micro_batches=micro_batches,
        batch_size=batch_size,
    )
    views, staleness, loss, teacher_parts, precision, recompute, micro_batches, batch_size = settings.values()
    n, mode = check_args(student, teacher, n_gpus, mode, micro_batches, max_candidates)
    check_options(schedule, refine, batch_size, views, staleness, loss)
    saved_per_device = check_stages_per_device(stages_per_device, mode=mode, schedule=schedule, plan=plan,
                                               balance=balance, refine=refine, recompute=recompute)  # fmt: skip
    if isinstance(teacher_parts, bool) or not isinstance(teacher_parts, int) or teacher_parts < 1:
        raise TspipeError(f"teacher_parts must be an integer >= 1, got {teacher_parts!r}")
    if teacher_parts > 1 and schedule != "auto":
        raise TspipeError(f"teacher_parts={teacher_parts} needs schedule='auto' (the fixed schedules run the "
                          f"teacher in the student's micro-batches), got schedule={schedule!r}")  # fmt: skip
    if precision not in PRECISIONS:
        raise TspipeError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    scale = compute_bytes(precision) / 4  # the graphs' activations are fp32
    weight_copies = 0.0 if precision == "fp32" else scale  # autocast's weight casts, saved per forward
    for policy in (recompute,) if isinstance(recompute, str) else recompute:
        checked_recompute(policy, auto=True)
    views = views if views is not None else (2 if mode == "momentum" else 1)
    run_on = resolve_devices(devices, n)
    s_example = _example(example_inputs, example_kwargs)
    own = teacher_example_inputs is not None or teacher_example_kwargs is not None
    t_example = (
        _example(() if teacher_example_inputs is None else teacher_example_inputs, teacher_example_kwargs)
        if own
        else s_example
    )
    s_cap, t_cap = captured("student", student, s_example), captured("teacher", teacher, t_example)
    s_flat, t_flat = s_cap.flatten_inputs(*s_example), t_cap.flatten_inputs(*t_example)
    sizes, t_sizes = input_sizes(s_flat), input_sizes(t_flat)
    if sizes.get("B") != t_sizes.get("B"):
        raise TspipeError(
            f"the teacher's example holds {t_sizes.get('B')} samples and the student's {sizes.get('B')}; "
            "hint: teacher_example_inputs are the same samples as the student's, prepared for the teacher"
        )
    batch = batch_size or sizes.get("B", 1)
    m = micro_batches if micro_batches is not None else n
    if batch < m:
        given = f"micro_batches={m}" if micro_batches is not None else f"the {m} micro-batches of n_gpus={n}"
        raise TspipeError(
            f"the batch has {batch} samples, fewer than {given} (each micro-batch needs a sample); hint: a larger "
            "batch (batch_size=...), fewer micro-batches (micro_batches=...), or fewer devices"
        )
    if mode == "momentum":
        check_momentum_names(s_cap, t_cap)
    for role, cap, flat in (("student", s_cap, s_flat), ("teacher", t_cap, t_flat)):
        annotate_structure(cap.graph_module)
        check_shapes(role, cap, flat)
    specs = (
        [device_spec(s) for s in device_specs] if device_specs is not None else [spec_for(d) for d in run_on]
    )
    hw = hardware(run_on, specs, device_specs is not None, memory_limit, precision)
    polish_for = "tspipe" if schedule == "auto" else schedule  # (auto: the skeleton it is synthesized on)

    def chains(k: int) -> tuple[dict[str, int], dict[str, int], GraphChain, GraphChain, Any]:
        micro, t_micro = {**sizes, "B": math.ceil(batch / k)}, {**t_sizes, "B": math.ceil(batch / k)}
        s_gc = graph_chain(s_cap.graph_module, micro, max_candidates=max_candidates)
        t_gc = graph_chain(t_cap.graph_module, t_micro, max_candidates=max_candidates)
        return micro, t_micro, s_gc, t_gc, cut_space(plan, balance, s_cap, t_cap, s_gc, t_gc, n, mode)

    first = chains(m)  # every check that needs only the graphs comes before the costs (profiling)
    keep = keeps_saved_costs(plan, cost_model, profile, first[0]["B"], precision)  # (no profiling)
    s_cm, t_cm, cm_name = cost_models(
        "roofline" if keep else cost_model, profile, s_cap, t_cap, (s_example, t_example), run_on[0], specs[0],
        precision,
    )  # fmt: skip
    cm_name = plan.cost_model if keep and plan is not None else cm_name

    def partition_at(k: int) -> Partitioned:
        micro, t_micro, s_gc, t_gc, (fixed, pairs) = first if k == m else chains(k)
        tuned = make_schedule(polish_for, n, k, views=views, mode=mode, staleness=staleness, n_batches=4,
                              loss=loss) if polish_for is not None and n > 1 else None  # fmt: skip
        partitioner = Partitioner(
            s_gc,
            t_gc,
            per_stage(hw, saved_per_device),  # (a saved plan's virtual stages: a device each)
            k,
            optimizer_factor,
            fixed=fixed,
            pairs=pairs,
            schedule=tuned,
            synthesize=schedule == "auto",
            teacher_parts=teacher_parts,
            activation_scale=scale,
            split_shares=plan.student.timed_split() if keep and plan is not None else (),
        )
        s_costs, t_costs = scaled(  # every cost is for one micro-batch
            (s_cm.graph_costs(s_cap.graph_module, micro), t_cm.graph_costs(t_cap.graph_module, t_micro)),
            measured.get(k),
        )
        if keep:
            assert plan is not None and fixed is not None
            s_costs, t_costs = saved_costs(plan, (s_gc, t_gc), fixed, (s_costs, t_costs), scale)
        fitted = fit_memory(partitioner, (s_costs, t_costs), trained_under(k), recompute=recompute,
                            weight_copies=weight_copies)  # fmt: skip
        return Partitioned(k, micro, t_micro, s_gc, t_gc, fitted.partitioner, s_costs, t_costs, fitted.part,
                           fitted.recompute)  # fmt: skip

    def trained_under(k: int) -> ScheduleOf:  # the schedule a partition at k micro-batches trains with
        def build(problem: Problem, part: Partition) -> Schedule:  # (virtual stages: a device per stage)
            costs, stages = (
                schedule_costs(problem, part.student_cuts, part.teacher_cuts),
                len(problem.devices),
            )
            return make_schedule(schedule or "tspipe", stages, k, views=views, mode=mode, staleness=staleness,
                                 loss=loss, costs=costs, teacher_parts=teacher_parts,
                                 stages_per_device=stages // n)  # fmt: skip

        return build

    choose = schedule == "auto" and micro_batches is None and plan is None and balance is None and n > 1
    measured: dict[int, Any] = {}  # refine, on profiles: each candidate M's micro-batch as measured
    if choose and refine and cm_name in ("measured", "calibrated"):
        measured = measured_at((s_cap, t_cap), (s_flat, t_flat), batch, candidates(n, batch), run_on[0])
    if choose:  # M with the partition, by the synthesized schedule's simulated period
        chosen, _ = fastest(partition_at, candidates(n, batch), views=views, mode=mode, staleness=staleness,
                            loss=loss)  # fmt: skip
    else:
        chosen = partition_at(m)
    m, micro, t_micro, s_gc, t_gc = chosen.m, chosen.micro, chosen.t_micro, chosen.s_gc, chosen.t_gc
    partitioner, s_costs, t_costs, part = chosen.partitioner, chosen.s_costs, chosen.t_costs, chosen.part
    fixed = first[4][0]
    if refine:
        example_batch = sizes.get("B", 1)
        if micro["B"] != example_batch and not (s_cap.dynamic_batch and t_cap.dynamic_batch):
            raise TspipeError(
                f"refine runs the stages on one micro-batch of {micro['B']} samples, but a model was "
                f"captured for {example_batch} only; hint: example_inputs of {micro['B']} samples"
            )
        inputs = (at_batch(s_flat, example_batch, micro["B"]), at_batch(t_flat, example_batch, t_micro["B"]))
        part, s_costs, t_costs, partitioner = refine_step(
            part, partitioner, refine, (s_costs, t_costs), inputs, run_on[0]
        )
        cm_name += "+refined"

    def peaks(partitioner: Partitioner, part: Partition) -> tuple[tuple[StageMemory, ...], list[int]]:
        policies = chosen.recompute * (len(partitioner.devices) // n)  # (virtual stages: "never" on each)
        memory = predicted(partitioner, (s_costs, t_costs), part, trained_under(m), policies, weight_copies)
        totals = [sum(x.total for x in memory[j::n]) for j in range(n)]  # (a device's stages, summed)
        return memory, [j for j, d in enumerate(hw) if totals[j] > d.memory_bytes * (1 + 1e-9)]

    one_stage = partitioner
    memory, over = peaks(partitioner, part)
    if stages_per_device != 1 and not over:
        two = interleave(partitioner, (s_costs, t_costs), part, lambda p, cuts, _: trained_under(m)(p, cuts),
                         force=stages_per_device == 2)  # fmt: skip
        if two is not None:
            memory2, over2 = peaks(two.partitioner, two.part)
            if not over2 or stages_per_device == 2:  # ("auto" keeps one stage where two do not fit)
                partitioner, part, memory, over = two.partitioner, two.part, memory2, over2
    if over:  # refine's re-timed costs moved the cuts past the fitted limits, or two stages do not fit
        raise TspipeError(
            f"the plan's predicted peaks exceed the memory of devices {over}; hint: refine=0, stages_per_device=1, "
            "or more memory"
        )
    per_device = len(partitioner.devices) // n
    on = per_stage(run_on, per_device)  # each stage's device

    s_stages = split(s_gc, part.student_cuts, name=f"{s_cap.model_name}Stage")
    t_stages = split(t_gc, part.teacher_cuts, name=f"{t_cap.model_name}Stage")
    total_work = sum(c.fwd_ms + c.bwd_ms for c in s_costs) + sum(c.fwd_ms for c in t_costs)
    result = Plan(
        mode=mode,
        devices=tuple(str(d) for d in on),
        batch_size=batch,
        micro_batches=m,
        cost_model=cm_name,
        student=model_plan(
            s_cap, s_gc, s_stages, part.student_cuts, s_costs, on, micro, scale, partitioner.split_shares
        ),
        teacher=model_plan(t_cap, t_gc, t_stages, part.teacher_cuts, t_costs, on, t_micro, scale),
        loads_ms=tuple(float(x) * views for x in part.loads_ms),
        memory_bytes=tuple(x.total for x in memory),
        memory=memory,
        recompute=chosen.recompute if any(r != "never" for r in chosen.recompute) else (),
        lower_bound_ms=views * m * total_work / sum(d.speed for d in hw),
        baselines=tuple(
            (name, float(p.period_ms) * views) for name, p in one_stage.baselines(s_costs, t_costs)
        )
        if fixed is None
        else (),
        schedule=schedule or "tspipe",
        views=views,
        staleness=staleness,
        loss=loss,
        teacher_parts=teacher_parts,
        precision=precision,
        links=tuple((d.link_gbs, d.link_latency_ms) for d in partitioner.devices)
        if any(math.isfinite(d.link_gbs) or d.link_latency_ms for d in partitioner.devices)
        else (),
        stages_per_device=per_device,
    )
    return Pipeline(
        result, s_cap, t_cap, s_stages, t_stages, partitioner, s_costs, t_costs,
        student if not isinstance(student, CapturedModel) else None,
        teacher if not isinstance(teacher, CapturedModel) else None,
    )  # fmt: skip


def _example(inputs: Any, kwargs: dict[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return positional_args(inputs), dict(kwargs or {})
