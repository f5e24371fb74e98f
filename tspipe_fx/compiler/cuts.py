"""Where cuts may go: a saved plan's, a manual balance's, or the mirrored pairs of a momentum
teacher; and the checks that a plan or a momentum pair fits the models."""

from __future__ import annotations

from typing import Any

from tspipe_fx.compiler.partitioner import Cuts
from tspipe_fx.errors import TspipeError
from tspipe_fx.partition.problem import PartitionError
from tspipe_fx.passes.chain import GraphChain, mirror_map, mirrored_cuts
from tspipe_fx.passes.fingerprint import graph_fingerprint
from tspipe_fx.plan import Plan
from tspipe_fx.tracing.model import CapturedModel

__all__ = [
    "check_momentum_names",
    "check_plan",
    "cut_space",
    "cuts_from_balance",
    "manual_cuts",
    "shared_names",
]


def shared_names(s_cap: CapturedModel, t_cap: CapturedModel) -> set[str]:
    return set(dict(t_cap.graph_module.named_parameters())) & set(dict(s_cap.graph_module.named_parameters()))


def check_momentum_names(s_cap: CapturedModel, t_cap: CapturedModel) -> None:
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


def manual_cuts(
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
    s_cuts = cuts_from_balance(s_bal, s_gc, n, "student")
    if t_bal is not None:
        t_cuts = cuts_from_balance(t_bal, t_gc, n, "teacher")
    elif mode == "momentum":
        pairs = mirror_map(s_gc, t_gc, shared_names(s_cap, t_cap), s_cuts)
        off = [p for p in s_cuts if p not in pairs]
        if off:
            ok = mirrored_cuts(s_gc, t_gc, shared_names(s_cap, t_cap))
            raise TspipeError(
                f"student cuts at {[s_gc.nodes[p].name for p in off]} split parameters the teacher cannot "
                f"mirror; mirrorable cut nodes: {[s_gc.nodes[p].name for p, _ in ok][:20]}"
            )
        t_cuts = [pairs[p] for p in s_cuts]
    else:
        raise TspipeError("in KD mode balance must be a (student, teacher) pair of balances")
    return s_cuts, t_cuts


def cuts_from_balance(bal: Any, gc: GraphChain, n: int, role: str) -> list[int]:
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


def check_plan(
    plan: Plan, s_cap: CapturedModel, t_cap: CapturedModel, n: int, mode: str | None = None
) -> None:
    """``plan`` was made for these models, ``n`` devices and (if given) this mode."""
    if not isinstance(plan, Plan):
        raise TspipeError(f"plan must be a Plan, got {type(plan).__name__}")
    if plan.n_devices != n:
        raise TspipeError(f"the plan is for {plan.n_devices} devices, n_gpus is {n}")
    if mode is not None and plan.mode != mode:
        raise TspipeError(
            f"the plan is for mode {plan.mode!r}, this compile for mode {mode!r}; hint: compile with "
            f"mode={plan.mode!r}, or make a new plan"
        )
    for role, cap, mp in (("student", s_cap, plan.student), ("teacher", t_cap, plan.teacher)):
        if graph_fingerprint(cap.graph_module) != mp.graph_hash:
            raise TspipeError(
                f"the plan's {role} ({mp.model_name}, graph {mp.graph_hash}) is not this {role}'s graph "
                f"({graph_fingerprint(cap.graph_module)}); hint: compile the plan anew"
            )


def cut_space(
    plan: Plan | None,
    balance: Any,
    s_cap: CapturedModel,
    t_cap: CapturedModel,
    s_gc: GraphChain,
    t_gc: GraphChain,
    n: int,
    mode: str,
) -> tuple[Cuts | None, tuple[tuple[int, int], ...] | None]:
    """The cuts given (a saved plan, a manual balance), or a momentum pair's mirrored cut pairs;
    an error where there are too few positions for ``n`` stages."""
    if plan is not None:
        check_plan(plan, s_cap, t_cap, n, mode)
        return (
            [s_gc.position_of(name) for name in plan.student.cuts],
            [t_gc.position_of(name) for name in plan.teacher.cuts],
        ), None
    if balance is not None:
        return manual_cuts(balance, s_gc, t_gc, n, mode, s_cap, t_cap), None
    if mode == "momentum":
        pairs = mirrored_cuts(s_gc, t_gc, shared_names(s_cap, t_cap))
        if len(pairs) < n - 1:
            raise PartitionError(
                f"the momentum pair has {len(pairs)} cut positions that split the student and the "
                f"teacher alike: too few for {n} stages; hint: use fewer devices"
            )
        return None, tuple(pairs)
    for role, gc in (("student", s_gc), ("teacher", t_gc)):
        if len(gc.candidates) < n - 1:
            raise PartitionError(
                f"the {role} graph has {len(gc.candidates)} candidate cuts: too few for {n} stages; "
                "hint: use fewer devices, or allow more cut positions (max_candidates)"
            )
    return None, None
