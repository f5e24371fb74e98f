"""Pipeline schedules as pure data: tasks, generators, the validator and the simulator.

No torch here: the partitioner, the plan, the reports and both runtimes read the same lists.
"""

from tspipe_fx.schedule.generators import SCHEDULES, make_schedule
from tspipe_fx.schedule.simulator import Timeline, simulate, simulate_stages, transfer_ms, unit_costs
from tspipe_fx.schedule.task import Kind, Schedule, ScheduleError, Task, dependencies, must_precede
from tspipe_fx.schedule.validator import validate

__all__ = [
    "SCHEDULES",
    "Kind",
    "Schedule",
    "ScheduleError",
    "Task",
    "Timeline",
    "dependencies",
    "make_schedule",
    "must_precede",
    "simulate",
    "simulate_stages",
    "transfer_ms",
    "unit_costs",
    "validate",
]
