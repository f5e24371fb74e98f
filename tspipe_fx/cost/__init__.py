"""Costs: pluggable cost models, profiles and profiling, device specs, and stages timed whole.

``cost.profiles`` holds the shipped profiles (real models measured on real hardware);
:func:`tspipe_fx.profile` (``cost.profiling``) makes new ones. ``cost.profile`` is the module of
the :class:`Profile` data type (so no function of that name is exported here).
"""

from tspipe_fx.cost.builtin import MeasuredCost, ParamCountCost, RooflineCost, UniformCost
from tspipe_fx.cost.devices import DEVICE_SPECS, LINKS, DeviceSpec, device_spec, register_device_spec
from tspipe_fx.cost.model import CostModel, NodeCost, cost_model, flops, output_bytes, scale, total
from tspipe_fx.cost.profile import InputSpec, NodeProfile, Profile

__all__ = [
    "DEVICE_SPECS",
    "LINKS",
    "CostModel",
    "DeviceSpec",
    "InputSpec",
    "MeasuredCost",
    "NodeCost",
    "NodeProfile",
    "ParamCountCost",
    "Profile",
    "RooflineCost",
    "UniformCost",
    "cost_model",
    "device_spec",
    "flops",
    "output_bytes",
    "register_device_spec",
    "scale",
    "total",
]
