"""compile's argument checks: what it was given, before anything is captured or costed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from tspipe_fx.errors import TspipeError
from tspipe_fx.schedule.task import LOSSES
from tspipe_fx.tracing import CapturedModel

if TYPE_CHECKING:
    from tspipe_fx.plan import Plan

__all__ = ["Mode", "check_args", "check_options", "check_separate", "from_plan"]

Mode = Literal["kd", "momentum"]


def check_args(
    student: Any, teacher: Any, n_gpus: Any, mode: str, micro_batches: int | None, max_candidates: int
) -> tuple[int, Mode]:
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise TspipeError(f"the {role} must be an nn.Module, got {type(model).__name__}")
    check_separate(student, teacher)
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 1:
        raise TspipeError(f"n_gpus must be an integer >= 1, got {n_gpus!r}")
    if mode not in ("kd", "momentum"):
        raise TspipeError(f"mode must be 'kd' or 'momentum', got {mode!r}")
    if micro_batches is not None and (not isinstance(micro_batches, int) or micro_batches < 1):
        raise TspipeError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    if max_candidates < 1:
        raise TspipeError(f"max_candidates must be >= 1, got {max_candidates}")
    return n_gpus, mode  # type: ignore[return-value]


def check_separate(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must be a model of its own: trained weights come home into both modules, and
    the teacher's would overwrite the student's."""
    hint = (
        "hint: a momentum teacher is a copy of the student (teacher = copy.deepcopy(student)); a KD "
        "teacher is a separate model"
    )
    if student is teacher or (
        isinstance(student, CapturedModel) and isinstance(teacher, CapturedModel)
        and student.graph_module is teacher.graph_module
    ):  # fmt: skip
        raise TspipeError(
            f"the student and the teacher are the same {type(student).__name__} object: the teacher's "
            f"weights would overwrite the trained student's; {hint}"
        )
    teacher_ids = {id(p): n for n, p in teacher.named_parameters()}
    shared = [(n, teacher_ids[id(p)]) for n, p in student.named_parameters() if id(p) in teacher_ids]
    if shared:
        pairs = ", ".join(f"student {s} = teacher {t}" for s, t in shared[:5])
        raise TspipeError(
            f"the student and the teacher share {len(shared)} parameter objects ({pairs}"
            f"{', ...' if len(shared) > 5 else ''}): the teacher would move with the student; {hint}"
        )


def check_options(schedule: Any, refine: Any, batch_size: Any, views: Any, staleness: Any, loss: Any) -> None:
    if schedule not in (None, "auto", "tspipe", "gpipe", "1f1b"):
        raise TspipeError(
            f"schedule must be 'auto', 'tspipe', 'gpipe', '1f1b' or None (the plan's min-max optimum as "
            f"it is), got {schedule!r}"
        )
    if loss not in LOSSES:
        raise TspipeError(
            f"loss must be one of {list(LOSSES)} (what one loss call covers), got {loss!r}; hint: 'micro' "
            "for a mean over samples (soft-target KD, BYOL)"
        )
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise TspipeError(f"refine must be an integer >= 0 (rounds of stage timing), got {refine!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise TspipeError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if views not in (None, 1, 2):
        raise TspipeError(f"views must be 1 or 2 (inputs per sample), got {views!r}")
    if staleness not in (0, 1):
        raise TspipeError(f"staleness must be 0 (synchronous) or 1 (TSPipe), got {staleness!r}")


DEFAULTS = {"views": None, "staleness": 1, "loss": "batch", "teacher_parts": 1, "precision": "fp32",
            "recompute": "never", "micro_batches": None, "batch_size": None}  # fmt: skip


def from_plan(plan: Plan | None, **given: Any) -> dict[str, Any]:
    """compile's settings: each as given, else the saved plan's (compile(..., plan=p) rebuilds what
    was planned: its micro-batches, batch, views, staleness, loss, teacher parts, precision and
    recompute policies), else the default; in the order given."""
    recorded = (
        {
            "views": plan.views,
            "staleness": plan.staleness,
            "loss": plan.loss,
            "teacher_parts": plan.teacher_parts,
            "precision": plan.precision,
            "recompute": plan.recompute or "never",
            "micro_batches": plan.micro_batches,
            "batch_size": plan.batch_size,
        }
        if plan is not None
        else DEFAULTS
    )
    return {k: v if v is not None else recorded[k] for k, v in given.items()}
