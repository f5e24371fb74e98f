"""Optimizers per stage: built from the user's factory or instance, over the parameters a stage owns."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from tspipe_fx.errors import TspipeError

__all__ = ["OptimizerSpec", "build_optimizer", "clip_", "optimizer_params", "parameter_names"]

OptimizerSpec = Callable[[list[nn.Parameter]], torch.optim.Optimizer] | torch.optim.Optimizer


def parameter_names(module: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in ``module`` (a tied weight has several)."""
    names: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return names


def build_optimizer(
    spec: OptimizerSpec, params: dict[str, nn.Parameter], originals: dict[int, list[str]]
) -> torch.optim.Optimizer | None:
    """An optimizer over ``params`` (name -> tensor): a factory is called on them; an optimizer
    instance is rebuilt with the same class, and each of its param groups keeps its options,
    restricted to the parameters here (``originals`` maps id(original) -> its names; a tied
    weight has several). None where the instance holds none of them."""
    if isinstance(spec, torch.optim.Optimizer):
        groups = []
        for group in spec.param_groups:
            names = [next((n for n in originals.get(id(p), []) if n in params), "" if id(p) in originals else None)
                     for p in group["params"]]  # fmt: skip
            unknown = sum(n is None for n in names)
            if unknown:
                raise TspipeError(
                    f"the optimizer holds {unknown} parameters that are not the student's; hint: build it "
                    "over student.parameters(), or pass a factory (lambda params: SGD(params, lr=0.1))"
                )
            mine = [params[n] for n in names if n in params]
            if mine:
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine})
        if not groups:
            return None
        return type(spec)(groups)  # type: ignore[call-arg]  # each group carries every option
    if callable(spec):
        opt = spec(list(params.values()))
        if not isinstance(opt, torch.optim.Optimizer):
            raise TspipeError(
                f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer"
            )
        return opt
    raise TspipeError(
        f"optimizer must be a torch.optim.Optimizer or a factory params -> optimizer, got {type(spec).__name__}"
    )


def optimizer_params(opt: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """Every parameter an optimizer steps (none without one)."""
    return [p for g in opt.param_groups for p in g["params"]] if opt is not None else []


def clip_(
    grads: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], order: Sequence[str], max_norm: float
) -> None:
    """Scale ``grads`` (a stage's) as ``torch.nn.utils.clip_grad_norm_`` would on one device: by the
    norm of every parameter's gradient norm (``norms``: every stage's), stacked in the model's
    parameter order."""
    stacked = [norms[n] for n in order if n in norms] + [v for n, v in norms.items() if n not in order]
    total = torch.linalg.vector_norm(torch.stack(stacked)) if stacked else torch.tensor(0.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads.values():
        g.mul_(coef.to(g.device))
