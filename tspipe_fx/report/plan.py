"""Partition reports: a plan as text tables (renderers return strings; the library never prints)."""

from __future__ import annotations

from tabulate import tabulate

from tspipe_fx.plan import Plan, StagePlan, simulate_plan

__all__ = ["render_plan"]


def _span(stage: StagePlan) -> str:
    """The stage's module span (``layer3.0.bn2 .. fc``); its nodes where no module owns them."""
    first, last = stage.first_module, stage.last_module
    if not first:
        return f"nodes {stage.nodes[0]}..{stage.nodes[-1]}"
    return first if first == last else f"{first} .. {last}"


def _mb(x: float) -> float:
    return x / 2**20


def _uneven(plan: Plan) -> str:
    """The micro-batch sizes where the batch does not divide (the costs are of the largest)."""
    base, extra = divmod(plan.batch_size, plan.micro_batches)
    if not extra:
        return ""
    return f" (uneven: {extra} of {base + 1} samples, {plan.micro_batches - extra} of {base})"


def _memory(plan: Plan) -> str:
    """The predicted peak of every device by part, at its busiest moment under the schedule."""
    rows = [
        [j, m.recompute, m.in_flight, *(_mb(x) for x in (m.student_params, m.gradients, m.optimizer_state,
                                                          m.teacher_params, m.activations, m.boundaries,
                                                          m.working, m.total))]
        for j, m in enumerate(plan.memory)
    ]  # fmt: skip
    headers = ["dev" if plan.stages_per_device == 1 else "stage", "recompute", "in flight", "params MB", "grads MB", "optimizer MB", "teacher MB",
               "activations MB", "cut buffers MB", "working MB", "peak MB"]  # fmt: skip
    what = "device" if plan.stages_per_device == 1 else "stage (a device's peak is at most its stages' sum)"
    return f"predicted memory per {what} (at its busiest moment of the schedule):\n" + tabulate(
        rows, headers=headers, floatfmt=".1f"
    )


def _virtual(plan: Plan) -> str:
    v, n = plan.stages_per_device, plan.n_devices
    return "" if v == 1 else f" on {n} devices (stage j on device j % {n}: {v} stages each)"


def render_plan(plan: Plan) -> str:
    """Per-device stages and costs, then the period against the lower bound and simple policies.

    Times per micro-batch in the table; loads and the period per batch of ``micro_batches``.
    """
    rows = []
    for j, (s, t) in enumerate(zip(plan.student.stages, plan.teacher.stages, strict=True)):
        rows.append(
            [
                j,
                s.device,
                _span(s),
                _span(t),
                f"{_mb(s.param_bytes):.1f}/{_mb(t.param_bytes):.1f}",
                f"{s.fwd_flops / 1e9:.3f}/{t.fwd_flops / 1e9:.3f}",
                s.fwd_ms,
                s.bwd_ms,
                t.fwd_ms,
                f"{_mb(s.cut_in_bytes + t.cut_in_bytes):.2f}/{_mb(s.cut_out_bytes + t.cut_out_bytes):.2f}",
                _mb(plan.memory_bytes[j]),
                plan.loads_ms[j],
            ]
        )
    headers = [
        "dev" if plan.stages_per_device == 1 else "stage", "device", "student modules", "teacher modules", "params MB s/t",
        "GFLOP s/t", "s fwd ms", "s bwd ms", "t fwd ms", "cut MB in/out", "peak MB", "load ms",
    ]  # fmt: skip
    table = tabulate(rows, headers=headers, floatfmt=".3f")
    compute = plan.stage_costs().loads_ms(plan.micro_batches, plan.views, plan.stages_per_device)
    worst = max(range(plan.n_devices), key=lambda j: compute[j])
    timeline = simulate_plan(plan)
    period = timeline.period
    views = f", {plan.views} views" if plan.views > 1 else ""
    lines = [
        f"{plan.student.model_name} (student, {plan.student.method}) and {plan.teacher.model_name} "
        f"(teacher, {plan.teacher.method}), mode {plan.mode}, {plan.n_stages} stages{_virtual(plan)}, batch "
        f"{plan.batch_size} in {plan.micro_batches} micro-batches{_uneven(plan)}{views}, cost model "
        f"{plan.cost_model}{'' if plan.precision == 'fp32' else ', ' + plan.precision + ' activations'}",
        table,
        f"{'schedule':18s} {plan.schedule}{' (' + timeline.schedule.variant + ')' if timeline.schedule.variant else ''}"
        f", loss per {'batch' if plan.loss == 'batch' else 'micro-batch'}",
        f"{'period':18s} {period:12.3f} ms per batch (the schedule run on these costs, steady state)",
        f"{'busiest device':18s} {compute[worst]:12.3f} ms of compute per batch (device {worst}; no schedule is "
        "faster)",
        f"{'lower bound':18s} {plan.lower_bound_ms:12.3f} ms (all work spread evenly, no communication)",
        f"{'imbalance':18s} {100 * plan.imbalance:12.1f} % (the largest load, transfers included, over the "
        "lower bound)",
        f"{'efficiency':18s} {plan.lower_bound_ms / period if period else 1.0:12.3f} (lower bound / period)",
        f"{'throughput':18s} {plan.batch_size / period * 1e3 if period else float('inf'):12.1f} samples/s "
        "at that period",
    ]
    if plan.memory:
        lines.append(_memory(plan))
    for name, load in plan.baselines:
        lines.append(f"{name + ':':18s} {load:12.3f} ms busiest device ({load / plan.max_load_ms:.2f}x ours)")
    for role, mp in (("student", plan.student), ("teacher", plan.teacher)):
        for names, stages in mp.tie_groups:
            lines.append(
                f"tied ({role}): {', '.join(names)} on stages {list(stages)}: gradients summed, copies kept equal"
            )
    return "\n".join(lines)
