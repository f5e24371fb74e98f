"""The partitioner: plain per-node numbers in, cut positions out. Pure Python and numpy, no torch."""

from tspipe_fx.partition.brute import brute_force
from tspipe_fx.partition.objective import Objective, evaluate, fits, link_ms, stage_costs
from tspipe_fx.partition.polisher import polish, simulated_period
from tspipe_fx.partition.problem import Chain, Device, Partition, PartitionError, Problem, StageCost
from tspipe_fx.partition.solver import solve

__all__ = [
    "Chain",
    "Device",
    "Objective",
    "Partition",
    "PartitionError",
    "Problem",
    "StageCost",
    "brute_force",
    "evaluate",
    "fits",
    "link_ms",
    "polish",
    "simulated_period",
    "solve",
    "stage_costs",
]
