"""Runtimes: they execute a plan's schedule on staged models; they know nothing of tracing,
costing or partitioning (they get Stages, a Plan and a Schedule).

* :class:`~tspipe_fx.runtime.trainer.Trainer`: windows of the schedule, one batch in flight.
* :class:`~tspipe_fx.runtime.tasks.StageTasks`: the task code both runtimes run.
* :class:`~tspipe_fx.runtime.local.LocalRuntime`: one process, a thread per device.
* :mod:`tspipe_fx.runtime.dist`: one rank per device under torchrun, pipeline x data parallel.
* :class:`~tspipe_fx.runtime.reference.ReferenceTrainer`: the same semantics, not pipelined.
* :mod:`tspipe_fx.runtime.checkpoint`: save and resume.
"""

from tspipe_fx.runtime.checkpoint import load_checkpoint, save_checkpoint, save_consolidated
from tspipe_fx.runtime.local import LocalRuntime
from tspipe_fx.runtime.options import TrainOptions
from tspipe_fx.runtime.reference import ReferenceTrainer
from tspipe_fx.runtime.tasks import RuntimeFailure, StageTasks
from tspipe_fx.runtime.teacher import TeacherVersions
from tspipe_fx.runtime.trainer import StepLoss, Trainer

__all__ = [
    "LocalRuntime",
    "ReferenceTrainer",
    "RuntimeFailure",
    "StageTasks",
    "StepLoss",
    "TeacherVersions",
    "TrainOptions",
    "Trainer",
    "load_checkpoint",
    "save_checkpoint",
    "save_consolidated",
]
