"""A compiled pipeline: the plan, the captured models and their stages; it makes trainers and reports."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from tspipe_fx.compiler.cuts import check_plan
from tspipe_fx.compiler.partitioner import Partitioner
from tspipe_fx.cost.model import NodeCost
from tspipe_fx.partition.objective import evaluate
from tspipe_fx.partition.problem import Device, Partition
from tspipe_fx.passes.chain import GraphChain
from tspipe_fx.passes.split import split
from tspipe_fx.plan import Plan
from tspipe_fx.runtime.trainer import Trainer
from tspipe_fx.stage import Stage, StagedModel, tie_groups
from tspipe_fx.tracing.model import CapturedModel

__all__ = ["Pipeline"]


@dataclass(frozen=True)
class Pipeline:
    """A compiled teacher-student pipeline: the plan and one stage module per device and model."""

    plan: Plan
    student: CapturedModel
    teacher: CapturedModel
    student_io: list[Stage]
    teacher_io: list[Stage]
    partitioner: Partitioner  # the graphs, devices and constraints as the partitioner saw them
    student_costs: list[NodeCost]  # per graph node, per micro-batch
    teacher_costs: list[NodeCost]
    student_module: nn.Module | None = None  # the user's modules: trained weights come home here
    teacher_module: nn.Module | None = None

    @property
    def student_chain(self) -> GraphChain:
        return self.partitioner.student

    @property
    def teacher_chain(self) -> GraphChain:
        return self.partitioner.teacher

    @property
    def hardware(self) -> tuple[Device, ...]:
        return self.partitioner.devices

    @property
    def student_stages(self) -> list[fx.GraphModule]:
        return [s.module for s in self.student_io]

    @property
    def teacher_stages(self) -> list[fx.GraphModule]:
        return [s.module for s in self.teacher_io]

    def staged(self, role: str) -> StagedModel:
        """The ``"student"`` or the ``"teacher"`` as a runtime takes it."""
        cap, stages, home = (
            (self.student, self.student_io, self.student_module)
            if role == "student"
            else (self.teacher, self.teacher_io, self.teacher_module)
        )
        return StagedModel(
            cap.io,
            tuple(stages),
            tuple(tie_groups(stages)),
            home if home is not None else cap.graph_module,
            home,
        )

    def score(self, student_cuts: Sequence[int], teacher_cuts: Sequence[int]) -> Partition:
        """The plan's cost model applied to any cut positions (chain positions, any node).

        Example:
            >>> pipe.score([40], [100]).period_ms  # what a hand-written balance would cost
        """
        cuts = (list(student_cuts), list(teacher_cuts))
        return evaluate(self.partitioner.problem(self.student_costs, self.teacher_costs, cuts), *cuts)

    def with_plan(self, plan: Plan) -> Pipeline:
        """This pipeline cut as ``plan`` says (another process's plan for the same models: the
        distributed runtime makes every rank follow rank 0's)."""
        check_plan(plan, self.student, self.teacher, self.plan.n_devices, self.plan.mode)
        s_cuts = [self.student_chain.position_of(name) for name in plan.student.cuts]
        t_cuts = [self.teacher_chain.position_of(name) for name in plan.teacher.cuts]
        return dataclasses.replace(
            self,
            plan=plan,
            student_io=split(self.student_chain, s_cuts, name=f"{self.student.model_name}Stage"),
            teacher_io=split(self.teacher_chain, t_cuts, name=f"{self.teacher.model_name}Stage"),
        )

    def trainer(self, loss_fn: Any, *, optimizer: Any, runtime: str = "local", **options: Any) -> Trainer:
        """A :class:`~tspipe_fx.runtime.trainer.Trainer` for this pipeline (see its options).

        With ``runtime="dist"`` every rank follows rank 0's plan (a plan from measured costs may
        differ from rank to rank).
        """
        pipe = self
        if runtime == "dist":
            from tspipe_fx.runtime.dist.layout import agree_on_plan, init

            init(self.plan.n_devices)
            plan = agree_on_plan(self.plan)
            if (plan.student.cuts, plan.teacher.cuts) != (self.plan.student.cuts, self.plan.teacher.cuts):
                pipe = self.with_plan(plan)
            elif plan != self.plan:  # the same stages, rank 0's schedule and figures
                pipe = dataclasses.replace(self, plan=plan)
        return Trainer(
            pipe.plan, pipe.staged("student"), pipe.staged("teacher"), loss_fn,
            optimizer=optimizer, runtime=runtime, **options,
        )  # fmt: skip

    def report(self) -> str:
        """The partition tables (see :func:`tspipe_fx.report.plan.render_plan`)."""
        from tspipe_fx.report.plan import render_plan

        return render_plan(self.plan)
