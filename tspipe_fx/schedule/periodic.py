"""Periodic schedules: a first window, a steady window repeated, a last window.

The trainer runs a schedule window by window (each device's window ``b`` ends with its
optimizer step of ``b``) and cuts the windows from 1-, 2- and 3-batch schedules; a synthesized
schedule is therefore made of templates, so that every length holds the same windows and the
simulator's period describes what runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tspipe_fx.schedule.task import Schedule, Task, window_ends

__all__ = ["HORIZON", "Lists", "Templates", "horizon_of", "lay_out", "periodic", "window_lists"]

HORIZON = 4  # batches synthesized at once: a first window, two steady candidates, a last one


def horizon_of(stages_per_device: int) -> int:
    """Batches synthesized at once: :data:`HORIZON`, twice as many with virtual stages (a micro-batch
    laps the devices twice, and the order takes longer to settle: on momentum ViT-B's 32 stages the
    sixth window of eight repeats 3% faster than the second of four)."""
    return HORIZON if stages_per_device == 1 else 2 * HORIZON


Lists = tuple[tuple[Task, ...], ...]


@dataclass(frozen=True)
class Templates:
    """Per device, the task lists of a first, a steady and a last window; batches relative to the
    window's (a first window's teacher forward of the next batch has batch 1)."""

    first: Lists
    steady: Lists
    last: Lists
    split_backward: bool
    variant: str  # how it was made, for reports


def window_lists(lists: Lists, w: int) -> Lists:
    """Window ``w`` of every device's list (:func:`~tspipe_fx.schedule.task.window_ends`), batches
    made relative to ``w``."""
    out = []
    for tasks in lists:
        ends = window_ends(tasks)
        lo = ends[w - 1] + 1 if w > 0 else 0
        out.append(tuple(t.with_batch(t.batch - w) for t in tasks[lo : ends[w] + 1]))
    return tuple(out)


def lay_out(t: Templates, n_batches: int) -> Lists:
    """The templates repeated over ``n_batches`` batches: first, steady…, last."""
    out: list[list[Task]] = [[] for _ in t.first]
    for w in range(n_batches):
        if w == 0:
            parts = t.first if n_batches > 1 else tuple(
                tuple(x for x in tasks if x.batch == 0) for tasks in t.first
            )  # fmt: skip
        else:
            parts = t.last if w == n_batches - 1 else t.steady
        for d, tasks in enumerate(parts):
            out[d] += [x.with_batch(x.batch + w) for x in tasks]
    return tuple(tuple(x) for x in out)


def periodic(skeleton: Schedule, t: Templates, n_batches: int) -> Schedule:
    """The schedule the templates make over ``n_batches`` batches."""
    return dataclasses.replace(
        skeleton, n_batches=n_batches, split_backward=t.split_backward, devices=lay_out(t, n_batches)
    )
