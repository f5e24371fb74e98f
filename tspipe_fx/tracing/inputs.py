"""Naming a call's inputs: one identifier per tensor leaf of ``(args, kwargs)``, constants apart."""

from __future__ import annotations

import inspect
import keyword
import re
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import MappingKey, SequenceKey, TreeSpec, tree_flatten, tree_flatten_with_path

from tspipe_fx.stage import Constant

__all__ = ["leaf_names", "split_leaves"]


def leaf_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """One identifier per leaf of ``(args, kwargs)``: the forward parameter it belongs to."""
    params = list(inspect.signature(model.forward).parameters)
    names: list[str] = []
    for path, _ in tree_flatten_with_path((args, kwargs))[0]:
        top, key, *rest = path
        if isinstance(top, SequenceKey) and top.idx == 0 and isinstance(key, SequenceKey):
            base = params[key.idx] if key.idx < len(params) else f"arg{key.idx}"
        elif isinstance(key, MappingKey):
            base = str(key.key)
        else:
            base = "input"
        parts = [base] + [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", "")))) for k in rest]
        names.append(_identifier("_".join(parts)))
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}_{seen[n] - 1}")
    return unique


def _identifier(s: str) -> str:
    s = re.sub(r"\W", "_", s)
    if not s or s[0].isdigit() or keyword.iskeyword(s):
        s = f"x_{s}"
    return s


def split_leaves(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[Any], TreeSpec, list[int], list[str], list[Constant]]:
    leaves, in_spec = tree_flatten((args, kwargs))
    names = leaf_names(model, args, kwargs)
    tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    constants = [Constant(i, names[i], x) for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor)]
    return leaves, in_spec, tensor_pos, [names[i] for i in tensor_pos], constants
