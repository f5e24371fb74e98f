"""Custom ``torch.autograd.Function``s under capture: kept whole, or named.

Both tracers run through ``Function.apply`` into the function's ``forward``, so a captured graph
would differentiate the forward and drop the user's ``backward`` (a gradient-reversal layer would
train with the wrong sign, and the captured outputs would still equal the model's). Under fx,
:func:`functions_kept` makes each call one opaque ``call_function`` node that calls the user's
Function, so autograd runs its ``backward``. ``torch.export`` cannot keep them:
:func:`functions_seen` records the custom Functions an export run calls, and capture refuses
the model with their names.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

__all__ = ["function_call", "functions_kept", "functions_seen"]


def _custom(cls: type) -> bool:
    """A Function of the user's (or a library's), not one of torch's own."""
    return not cls.__module__.startswith("torch.")


@functools.cache
def function_call(cls: type[torch.autograd.Function]) -> Callable[..., Any]:
    """The graph target of ``cls.apply``: a plain function, so fx's code calls it by reference."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return cls.apply(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"{cls.__name__}_apply"
    call.__module__ = __name__
    return call


_APPLY = torch.autograd.Function.__dict__["apply"]  # torch's own, restored after every patch


def _apply(cls: type[torch.autograd.Function], *args: Any, **kwargs: Any) -> Any:
    return _APPLY.__get__(None, cls)(*args, **kwargs)


@contextlib.contextmanager
def _patched_apply(replacement: Callable[..., Any]) -> Iterator[None]:
    torch.autograd.Function.apply = classmethod(replacement)
    try:
        yield
    finally:
        torch.autograd.Function.apply = _APPLY


@contextlib.contextmanager
def functions_kept() -> Iterator[None]:
    """While fx traces: a custom Function applied to a traced value becomes one node."""

    def apply(cls: type[torch.autograd.Function], *args: Any, **kwargs: Any) -> Any:
        proxies = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, fx.Proxy)]
        if proxies and _custom(cls):
            return proxies[0].tracer.create_proxy("call_function", function_call(cls), args, kwargs)
        return _apply(cls, *args, **kwargs)

    with _patched_apply(apply):
        yield


@contextlib.contextmanager
def functions_seen(seen: list[str]) -> Iterator[None]:
    """While export traces: append the qualified name of every custom Function applied."""

    def apply(cls: type[torch.autograd.Function], *args: Any, **kwargs: Any) -> Any:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if _custom(cls) and name not in seen:
            seen.append(name)
        return _apply(cls, *args, **kwargs)

    with _patched_apply(apply):
        yield
