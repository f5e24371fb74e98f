"""What planning hands to the runtime: stage modules with their I/O names, and each model's
calling convention.

* :class:`ModelIO`: how a model's call ``(args, kwargs)`` flattens into graph inputs and how the
  flat graph outputs rebuild its result (tensor, tuple, dict, Hugging Face ``ModelOutput``).
* :class:`Stage`: one stage's ``fx.GraphModule``, the values it takes and gives, and the inputs
  an in-place op writes (found once, by the split pass: the runtime clones those before use,
  as autograd forbids writing to a leaf).
* :class:`StagedModel`: one model cut into stages, with its tie groups and the modules whose
  parameters it trains.

A parameter read in several stages (a tied weight: BERT's decoder and word embeddings, GPT-2's
``lm_head`` and ``wte``) is referenced by each of them and reported by :func:`tie_groups`, so
the runtime can sum its gradients and keep the copies equal once stages live on different
devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from tspipe_fx.errors import CaptureError

__all__ = [
    "Constant",
    "ModelIO",
    "Stage",
    "StagedModel",
    "TieGroup",
    "copy_buffer_persistence",
    "run_stages",
    "tensors_by_id",
    "tie_groups",
]

TieGroup = tuple[tuple[str, ...], tuple[int, ...]]  # (tensor names, the stages holding it)


@dataclass(frozen=True)
class Constant:
    """A non-tensor leaf of the example call, baked into the graph."""

    position: int  # index among all leaves of (args, kwargs)
    name: str
    value: Any


def positional_args(inputs: Any) -> tuple[Any, ...]:
    """A call's positional arguments as given by a user: a tensor is one argument, a tuple or
    list are the arguments."""
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


@dataclass(frozen=True)
class ModelIO:
    """A captured model's calling convention: flat tensor inputs in, flat outputs out.

    Attributes:
        in_spec: the pytree structure of the example call ``(args, kwargs)``.
        out_spec: the pytree structure of the model's result.
        constants: non-tensor leaves of the example call, checked on every call.
        input_names: one name per flat input, derived from the forward signature.
        model_name: class name of the captured model.
    """

    in_spec: TreeSpec
    out_spec: TreeSpec
    constants: tuple[Constant, ...]
    input_names: tuple[str, ...]
    model_name: str

    def flatten_inputs(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The flat tensor inputs of the graph for a call like the original's."""
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.in_spec:
            raise CaptureError(
                f"{self.model_name} was captured for inputs structured as {_describe(self.in_spec)}, but was called with "
                f"{_describe(spec)}; hint: pass the same positional and keyword arguments as the "
                "example, or capture again with this call's structure"
            )
        by_position = {c.position: c for c in self.constants}
        tensors: list[torch.Tensor] = []
        for i, leaf in enumerate(leaves):
            const = by_position.get(i)
            if const is None:
                if not isinstance(leaf, torch.Tensor):
                    raise CaptureError(
                        f"input {self.input_names[len(tensors)]!r} of {self.model_name} must be "
                        f"a tensor, got {type(leaf).__name__}"
                    )
                tensors.append(leaf)
            elif not _same_constant(leaf, const.value):
                raise CaptureError(
                    f"{self.model_name} was captured with {const.name}={const.value!r}, which is "
                    f"baked into the graph, but was called with {const.name}={leaf!r}; hint: "
                    "capture again with this value"
                )
        return tensors

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        """Rebuild the original output structure from the graph's flat outputs."""
        return tree_unflatten(list(flat), self.out_spec)


def _describe(spec: TreeSpec) -> str:
    """A call's structure in words: ``2 positional inputs and keywords ['mask']``."""
    args, kwargs = tree_unflatten([None] * spec.num_leaves, spec)
    words = f"{len(args)} positional input{'s' if len(args) != 1 else ''}"
    return f"{words} and keywords {sorted(kwargs)}" if kwargs else f"{words} and no keywords"


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values are simply not the same
        return False


@dataclass(frozen=True)
class Stage:
    """One stage: its module and the names of the values it takes and gives."""

    module: fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    nodes: tuple[str, ...]  # names of the chain nodes it computes
    written_inputs: frozenset[str] = frozenset()  # inputs an in-place op writes (cloned first)


@dataclass(frozen=True)
class StagedModel:
    """One model cut into stages: what a runtime trains or runs.

    Attributes:
        io: the model's calling convention.
        stages: one per device, in order.
        ties: tensors held by several stages (see :func:`tie_groups`).
        parameters: the module whose parameters the stages hold (the user's, or the captured
            graph's: the same tensors); optimizers given as instances are mapped through it.
        home: the user's module, where trained weights come home (None: nowhere).
    """

    io: ModelIO
    stages: tuple[Stage, ...]
    ties: tuple[TieGroup, ...]
    parameters: nn.Module
    home: nn.Module | None = None


def tensors_by_id(module: nn.Module, *, buffers: bool = True) -> dict[int, list[str]]:
    """id(tensor) -> every name it has in ``module`` (parameters and, unless told not to,
    buffers; aliases too)."""
    names: dict[int, list[str]] = {}
    for name, t in [
        *module.named_parameters(remove_duplicate=False),
        *(module.named_buffers(remove_duplicate=False) if buffers else []),
    ]:
        names.setdefault(id(t), []).append(name)
    return names


def copy_buffer_persistence(source: nn.Module, target: nn.Module) -> None:
    """Mark ``target``'s buffers non-persistent where ``source``'s of the same name are (fx's
    GraphModule registers every buffer it copies as persistent, so a ``persistent=False`` buffer
    such as timm Swin's ``relative_position_index`` would enter the state_dict)."""
    for name, _ in target.named_buffers():
        *path, leaf = name.split(".")
        try:
            owner = source.get_submodule(".".join(path))
        except AttributeError:
            continue
        if leaf in owner._non_persistent_buffers_set:
            target.get_submodule(".".join(path))._non_persistent_buffers_set.add(leaf)


def tie_groups(stages: Sequence[Stage]) -> list[TieGroup]:
    """Parameters held by several stages: ``(their names, the stages holding them)``.

    Buffers and constants several stages read (a rotary ``inv_freq``) are no tie group: each
    stage keeps its own copy, and nothing trains them.
    """
    held: dict[int, tuple[set[str], list[int]]] = {}
    for k, stage in enumerate(stages):
        for tid, names in tensors_by_id(stage.module, buffers=False).items():
            entry = held.setdefault(tid, (set(), []))
            entry[0].update(names)
            entry[1].append(k)
    return sorted((tuple(sorted(names)), tuple(ks)) for names, ks in held.values() if len(ks) > 1)


def run_stages(stages: Sequence[Stage], inputs: Sequence[object]) -> tuple[object, ...]:
    """Run the stages one after another, passing values by name: the unsplit graph's result."""
    env: dict[str, object] = dict(zip(stages[0].inputs, inputs, strict=True))
    out: tuple[object, ...] = ()
    for stage in stages:
        out = tuple(stage.module(*(env[name] for name in stage.inputs)))
        env.update(zip(stage.outputs, out, strict=True))
    return out
