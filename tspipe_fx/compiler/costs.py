"""Which cost model prices each graph: a given one, a built-in by name, or profiles (measured now
on the first device, or given)."""

from __future__ import annotations

from typing import Any

import torch

from tspipe_fx.cost.builtin import MeasuredCost, ParamCountCost, RooflineCost, UniformCost
from tspipe_fx.cost.devices import DeviceSpec
from tspipe_fx.cost.model import CostModel
from tspipe_fx.cost.profile import Profile
from tspipe_fx.cost.profiling import profile
from tspipe_fx.errors import TspipeError
from tspipe_fx.tracing.model import CapturedModel

__all__ = ["cost_models"]


def cost_models(
    cost_model: CostModel | str | tuple[CostModel, CostModel] | None,
    profiles: tuple[Profile, Profile] | None,
    s_cap: CapturedModel,
    t_cap: CapturedModel,
    examples: tuple[tuple[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]],
    device: torch.device,
    spec: DeviceSpec,
    precision: str = "fp32",
) -> tuple[CostModel, CostModel, str]:
    if isinstance(cost_model, tuple):
        if len(cost_model) != 2 or not all(isinstance(c, CostModel) for c in cost_model):
            raise TspipeError("cost_model as a tuple must be (student CostModel, teacher CostModel)")
        return cost_model[0], cost_model[1], f"{cost_model[0].name}/{cost_model[1].name}"
    if isinstance(cost_model, CostModel):
        return cost_model, cost_model, cost_model.name
    if cost_model in ("roofline", "params", "uniform"):
        dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]  # its peak
        builtin = {"roofline": lambda: RooflineCost(spec, dtype=dtype),
                   "params": ParamCountCost, "uniform": UniformCost}[cost_model]  # fmt: skip
        return builtin(), builtin(), str(cost_model)
    if cost_model not in (None, "measured", "calibrated"):
        raise TspipeError(
            f"unknown cost_model {cost_model!r}; use a CostModel, a (student, teacher) pair, or one of "
            "'measured', 'calibrated', 'roofline', 'params', 'uniform'"
        )
    if profiles is None:  # both models measured on their example batch, called as the user calls them
        (s_args, s_kwargs), (t_args, t_kwargs) = examples
        profiles = (
            profile(s_cap, s_args, example_kwargs=s_kwargs, device=device, repeats=3),
            profile(t_cap, t_args, example_kwargs=t_kwargs, device=device, repeats=3),
        )
    if len(profiles) != 2 or not all(isinstance(p, Profile) for p in profiles):
        raise TspipeError("profile must be a (student Profile, teacher Profile) pair")
    calibrate = cost_model == "calibrated"  # node times scaled to the whole models' measured totals
    return (
        MeasuredCost(profiles[0], calibrate=calibrate),
        MeasuredCost(profiles[1], calibrate=calibrate),
        "calibrated" if calibrate else "measured",
    )
