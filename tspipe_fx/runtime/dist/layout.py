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
    """Where this rank sits: ``pipelines`` replicas of ``n_stages`` consecutive ranks."""

    rank: int
    world: int
    n_stages: int

    @property
    def pipelines(self) -> int:
        return self.world // self.n_stages

    @property
    def pipeline(self) -> int:
        return self.rank // self.n_stages

    @property
    def stage(self) -> int:
        return self.stage_of(self.rank)

    def stage_of(self, rank: int) -> int:
        return rank % self.n_stages

    def rank_of(self, stage: int, pipeline: int | None = None) -> int:
        return (self.pipeline if pipeline is None else pipeline) * self.n_stages + stage


def init(n_stages: int) -> tuple[Layout, torch.device]:
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
    if world % n_stages:
        raise TspipeError(
            f"the world has {world} ranks, not a multiple of the pipeline's {n_stages} stages; hint: "
            f"launch n_stages x replicas ranks (torchrun --nproc-per-node {n_stages})"
        )
    if dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Layout(rank, world, n_stages), device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def agree_on_plan(plan: Plan) -> Plan:
    """Rank 0's plan for every rank: a plan from measured costs may differ from rank to rank."""
    box = [plan.to_json() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Plan.from_json(str(box[0]))
