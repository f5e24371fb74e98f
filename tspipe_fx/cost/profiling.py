"""``tspipe_fx.profile``: measure every node of a model on a device, into a :class:`Profile`."""

from __future__ import annotations

import copy
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from tspipe_fx.cost.launch import launch_us, step_host_us
from tspipe_fx.cost.profile import NodeProfile, Profile, input_specs
from tspipe_fx.errors import ProfileError
from tspipe_fx.passes import annotate_measured, annotate_structure, annotate_symbolic
from tspipe_fx.passes.fingerprint import graph_fingerprint, target_name
from tspipe_fx.passes.meta import info
from tspipe_fx.passes.symbolic import SIZES_KEY, input_sizes
from tspipe_fx.passes.timer import Timer
from tspipe_fx.stage import positional_args
from tspipe_fx.tracing import CapturedModel, capture

__all__ = ["device_name", "profile"]


def device_name(device: torch.device) -> str:
    """A human name of the device: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or device.type


def _resolve_device(device: torch.device | str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ProfileError(f"not a device: {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ProfileError(
                f"cannot profile on {dev}: torch.cuda.is_available() is False; hint: device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ProfileError(f"cannot profile on {dev}: only {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise ProfileError(f"cannot profile on {dev}: only 'cpu' and 'cuda' devices are supported")
    return dev


def profile(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    *,
    example_kwargs: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    progress: bool | None = None,
) -> Profile:
    """Measure every node of ``model`` (captured first if it is a plain module).

    Works on a deep copy on ``device``, with the RNG forked: the user's parameters, buffers,
    ``.grad`` and train/eval flags are untouched.

    Args:
        model: an ``nn.Module`` or a :class:`CapturedModel`.
        example_inputs: positional arguments of one training batch.
        example_kwargs: keyword arguments of that call.
        device: where to measure (``"cpu"``, ``"cuda:0"``).
        repeats: timed runs per node; the median is kept.
        warmup: untimed runs per node before timing.
        progress: show a progress bar (default: when stderr is a terminal).

    Example:
        >>> prof = profile(timm.create_model("resnet18"), (torch.randn(8, 3, 224, 224),))
        >>> prof.fidelity_fwd_bwd  # doctest: +SKIP
        0.97
    """
    if repeats < 1 or warmup < 0:
        raise ProfileError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    dev = _resolve_device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        captured, gm, inputs, fwd_ms, fwd_bwd_ms, host_us = _profile(
            model, example_inputs, example_kwargs, dev, repeats, warmup, progress
        )
    launch = _launch_us(dev, host_us)
    return Profile(
        model_name=captured.model_name,
        graph_hash=graph_fingerprint(captured.graph_module),
        inputs=input_specs(gm, inputs),
        device_name=device_name(dev),
        torch_version=torch.__version__,
        repeats=repeats,
        model_fwd_ms=fwd_ms,
        model_fwd_bwd_ms=fwd_bwd_ms,
        nodes=tuple(NodeProfile(n.name, n.op, target_name(n.target), info(n)) for n in gm.graph.nodes),
        launch_us=launch[0],
        launch_bwd_us=launch[1],
    )


def _launch_us(dev: torch.device, host_us: tuple[float, ...] | None) -> tuple[float, float]:
    """The host's cost per forward and per backward operation: the model's own step's
    (``host_us``: on a GPU, where the host did not wait for the device while timed), never below
    the one-element loop's; else the loop's for both (on a CPU a node's measured time already
    holds its host's work)."""
    loop = launch_us(dev)
    if host_us is None:
        return loop, loop
    fwd, bwd = host_us
    return max(loop, fwd), max(loop, bwd)


def _profile(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    example_kwargs: dict[str, Any] | None,
    dev: torch.device,
    repeats: int,
    warmup: int,
    progress: bool | None,
) -> tuple[CapturedModel, fx.GraphModule, list[torch.Tensor], float, float, tuple[float, ...] | None]:
    if isinstance(model, CapturedModel):
        captured = model
    elif isinstance(model, nn.Module):
        captured = capture(model, example_inputs, example_kwargs=example_kwargs)
    else:
        raise ProfileError(f"profile() needs an nn.Module or a CapturedModel, got {type(model).__name__}")
    flat = captured.flatten_inputs(positional_args(example_inputs), example_kwargs or {})
    gm = copy.deepcopy(captured.graph_module).to(dev)
    inputs = [
        x.to(dev, copy=True) for x in flat
    ]  # runs of a model that writes its inputs leave the user's be
    show = sys.stderr.isatty() if progress is None else progress
    fwd_ms, fwd_bwd_ms = _whole_model_ms(gm, inputs, captured.model_name, repeats, max(warmup, 1))
    if gm.meta.get(SIZES_KEY) != input_sizes(inputs):  # compile ran both passes already: once a model
        annotate_structure(gm)
        annotate_symbolic(gm, inputs)
    annotate_measured(gm, inputs, repeats=repeats, warmup=warmup, progress=show)
    device_ms = sum((info(n).fwd_ms or 0.0) + (info(n).bwd_ms or 0.0) for n in gm.graph.nodes)
    host_us = _host_us(gm, inputs, repeats, device_ms) if dev.type == "cuda" else None
    return captured, gm, inputs, fwd_ms, fwd_bwd_ms, host_us


def _host_us(
    gm: fx.GraphModule, inputs: list[torch.Tensor], repeats: int, device_ms: float
) -> tuple[float, ...] | None:
    """The host's microseconds per operation of the whole graph's forward and of its backward
    (each timed on its own: fewer kernels than the launch queue holds, where they can be); see
    :func:`step_host_us`. ``device_ms``: the nodes' measured times, summed."""
    parts = _step_parts(gm, inputs)
    for part in parts:
        part()
    return step_host_us(parts, inputs[0].device, repeats=repeats, device_ms=device_ms)


def _step_parts(
    gm: fx.GraphModule, inputs: list[torch.Tensor]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """One training step of the whole graph as its forward (its outputs that need a gradient
    kept) and its backward (ones as their gradients; the parameters' gradients dropped)."""
    held: list[torch.Tensor] = []

    def forward() -> None:
        with torch.enable_grad():
            held[:] = [t for t in gm(*inputs) if isinstance(t, torch.Tensor) and t.requires_grad]

    def backward() -> None:
        if held:
            torch.autograd.backward(held, [torch.ones_like(t) for t in held])
        held.clear()
        for p in gm.parameters():
            p.grad = None

    return forward, backward


def _whole_model_ms(
    gm: fx.GraphModule, inputs: list[torch.Tensor], name: str, repeats: int, warmup: int
) -> tuple[float, float]:
    """Median forward and forward+backward time of the whole graph (the fidelity reference)."""
    timer = Timer(inputs[0].device)
    try:
        with torch.enable_grad():
            gm(*inputs)
    except Exception as e:
        shapes = ", ".join(f"{tuple(x.shape)}:{x.dtype}" for x in inputs)
        raise ProfileError(
            f"the example inputs ({shapes}) do not fit {name}: {type(e).__name__}: {e}; "
            "hint: check the batch's shape and dtype against what the model expects"
        ) from e

    def forward() -> None:
        with torch.enable_grad():
            gm(*inputs)

    step_forward, step_backward = _step_parts(gm, inputs)

    def forward_backward() -> None:
        step_forward()
        step_backward()

    # Warm up with full steps (the first backward allocates the gradients), then alternate the
    # two measurements so that drifts in machine load hit both alike.
    timer.median_ms(forward_backward, repeats=1, warmup=warmup)
    fwd, fwd_bwd = [], []
    for _ in range(repeats):
        fwd.append(timer.median_ms(forward, repeats=1, warmup=0))
        fwd_bwd.append(timer.median_ms(forward_backward, repeats=1, warmup=0))
    return statistics.median(fwd), statistics.median(fwd_bwd)
