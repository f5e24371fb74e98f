"""Where each rank sits: joining torchrun's process group, pipelines of consecutive ranks, and
rank 0's plan for all."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tspipe_fx.errors import TspipeError
from tspipe_fx.plan import Plan

__all__ = ["Layout", "agree_on_plan", "init"]


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: ``pipelines`` replicas of ``n_devices`` consecutive ranks, rank
    ``r`` holding stages ``r % n_devices + k * n_devices`` (``k < stages_per_device``: virtual
    stages, :attr:`~tspipe_fx.schedule.task.Schedule.stages_per_device`)."""

    rank: int
    world: int
    n_devices: int
    stages_per_device: int = 1

    @property
    def n_stages(self) -> int:
        return self.n_devices * self.stages_per_device

    @property
    def pipelines(self) -> int:
        return self.world // self.n_devices

    @property
    def pipeline(self) -> int:
        return self.rank // self.n_devices

    @property
    def device(self) -> int:
        """This rank's place in its pipeline (the schedule's device)."""
        return self.rank % self.n_devices

    @property
    def stages(self) -> list[int]:
        """The stages this rank runs."""
        return self.stages_of(self.rank)

    def stages_of(self, rank: int) -> list[int]:
        return [rank % self.n_devices + k * self.n_devices for k in range(self.stages_per_device)]

    def where(self, rank: int) -> str:
        """``rank``'s stages, in words: ``"stage 1"`` or ``"stages 1, 3"``."""
        held = self.stages_of(rank)
        return f"stage{'s' if len(held) > 1 else ''} {', '.join(map(str, held))}"

    def device_of(self, stage: int) -> int:
        """The place in a pipeline of the rank that runs ``stage``."""
        return stage % self.n_devices

    def rank_of(self, stage: int, pipeline: int | None = None) -> int:
        return (self.pipeline if pipeline is None else pipeline) * self.n_devices + self.device_of(stage)


def init(n_devices: int, stages_per_device: int = 1) -> tuple[Layout, torch.device]:
    """Join (or reuse) the process group from torchrun's environment; this rank's device.

    NCCL with ``cuda:LOCAL_RANK`` where CUDA is available, gloo on the CPU otherwise.
    """
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise TspipeError(
                f"runtime='dist' needs a process group, and the environment lacks {missing}; hint: "
                "start the script with torchrun --nproc-per-node N script.py (or call "
                "torch.distributed.init_process_group first)"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        atexit.register(_destroy)  # ours to end; runs after the watchdog's goodbye (LIFO)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % n_devices:
        raise TspipeError(
            f"the world has {world} ranks, not a multiple of the pipeline's {n_devices} devices; hint: "
            f"launch devices x replicas ranks (torchrun --nproc-per-node {n_devices})"
        )
    if dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Layout(rank, world, n_devices, stages_per_device), device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def agree_on_plan(plan: Plan) -> Plan:
    """Rank 0's plan for every rank: a plan from measured costs may differ from rank to rank."""
    box = [plan.to_json() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Plan.from_json(str(box[0]))
