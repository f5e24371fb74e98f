"""Models named by a string, with an example batch: what the ``tspipe-fx`` command line builds.

    timm:resnet152                        timm.create_model(NAME, pretrained=False, **options)
    torchvision:resnet18                  torchvision.models.get_model(NAME, weights=None, **options)
    hf:BertConfig                         transformers.AutoModel.from_config(BertConfig(**options))
    hf:BertConfig:BertForMaskedLM         ... or that model class
    my_pkg.models:build                   build(**options): a module, or (module, example inputs)

Nothing is downloaded: timm and torchvision models get no weights, Hugging Face models come from
their config classes. The example batch is images ``(B, 3, H, W)`` (timm's input size for its
models, ``image_size`` otherwise), token ids ``(B, S)`` with an attention mask for Hugging Face
text models (``pixel_values`` for their vision models), or what the callable returns.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tspipe_fx.errors import TspipeError
from tspipe_fx.stage import positional_args

__all__ = ["BuiltModel", "build_model", "parse_options"]

KINDS = ("timm", "torchvision", "hf")


@dataclass
class BuiltModel:
    """A model and one example batch for it (positional and keyword inputs)."""

    spec: str
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_options(items: Sequence[str], *, flag: str) -> dict[str, dict[str, Any]]:
    """``["dim=64", "student.n_layers=2"]`` -> ``{"": {"dim": 64}, "student": {"n_layers": 2}}``.

    Values are Python literals where they parse as one (``64``, ``0.1``, ``True``, ``(1, 2)``),
    else strings. A ``student.`` or ``teacher.`` prefix sends an option to one model only.
    """
    out: dict[str, dict[str, Any]] = {"": {}, "student": {}, "teacher": {}}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise TspipeError(f"{flag} takes key=value, got {item!r}; hint: {flag} hidden_size=64")
        role, dot, name = key.partition(".")
        if not dot or role not in ("student", "teacher"):
            role, name = "", key
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[role][name] = value
    return out


def build_model(
    spec: str, *, batch: int, options: dict[str, Any] | None = None, image_size: int | None = None,
    seq_len: int = 128,
) -> BuiltModel:  # fmt: skip
    """Build the model ``spec`` names and an example batch of ``batch`` samples.

    Example:
        >>> m = build_model("hf:BertConfig:BertForMaskedLM", batch=2, options={"num_hidden_layers": 2})
        >>> m.kwargs["input_ids"].shape
        torch.Size([2, 128])
    """
    options = dict(options or {})
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise TspipeError(
            f"model {spec!r}: expected KIND:NAME, KIND one of {', '.join(KINDS)} or a module path; "
            "hint: timm:resnet18, torchvision:resnet18, hf:BertConfig, my_pkg.models:build"
        )
    if kind == "timm":
        module = _timm(rest, options)
        cfg: dict[str, Any] = getattr(module, "pretrained_cfg", None) or {}
        size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        return BuiltModel(spec, module, (_images(batch, size),))
    if kind == "torchvision":
        module = _torchvision(rest, options)
        return BuiltModel(spec, module, (_images(batch, image_size or 224),))
    if kind == "hf":
        return _hf(spec, rest, options, batch, image_size, seq_len)
    return _callable(spec, kind, rest, options, batch, image_size or 224)


def _images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def _close(name: str, known: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    return f"; did you mean {', '.join(near)}?" if near else ""


def _timm(name: str, options: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise TspipeError(f"timm has no model {name!r}{_close(name, timm.list_models())}")
    try:
        return timm.create_model(name, pretrained=False, **options)
    except TypeError as e:
        raise TspipeError(f"timm:{name} does not take these options {options}: {e}") from None


def _torchvision(name: str, options: dict[str, Any]) -> nn.Module:
    from torchvision import models

    known = models.list_models()
    if name not in known:
        raise TspipeError(f"torchvision has no model {name!r}{_close(name, known)}")
    try:
        return models.get_model(name, weights=None, **options)
    except TypeError as e:
        raise TspipeError(f"torchvision:{name} does not take these options {options}: {e}") from None


def _hf(
    spec: str, rest: str, options: dict[str, Any], batch: int, image_size: int | None, seq_len: int
) -> BuiltModel:
    import transformers

    config_name, _, model_name = rest.partition(":")
    config_cls = getattr(transformers, config_name, None)
    if config_cls is None or not config_name.endswith("Config"):
        configs = [n for n in dir(transformers) if n.endswith("Config")]
        raise TspipeError(f"transformers has no config class {config_name!r}{_close(config_name, configs)}")
    defaults = config_cls()
    unknown = sorted(k for k in options if not hasattr(defaults, k))
    if unknown:  # a config takes any keyword silently; a typo would plan another model
        fields = sorted(k for k in defaults.to_dict() if not k.startswith("_"))
        hints = "".join(_close(k, fields) for k in unknown)
        raise TspipeError(f"{config_name} has no field(s) {unknown}{hints}; its fields: {fields}")
    config = config_cls(**options)
    if model_name:
        model_cls = getattr(transformers, model_name, None)
        if model_cls is None:
            models = [n for n in dir(transformers) if n.startswith(config_name[: -len("Config")])]
            raise TspipeError(f"transformers has no model class {model_name!r}{_close(model_name, models)}")
        module = model_cls(config)
    else:
        module = transformers.AutoModel.from_config(config)  # type: ignore[no-untyped-call]
    kwargs: dict[str, Any] = {}
    if hasattr(config, "vocab_size") and not hasattr(config, "num_channels"):
        ids = torch.randint(0, config.vocab_size, (batch, seq_len))
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        size = image_size or int(getattr(config, "image_size", 224))
        kwargs = {"pixel_values": _images(batch, size)}
    if getattr(config, "use_cache", False) and "use_cache" in inspect.signature(module.forward).parameters:
        kwargs["use_cache"] = False  # no key/value cache in training (and GPT-2 exports without it)
    return BuiltModel(spec, module, (), kwargs)


def _callable(spec: str, path: str, name: str, options: dict[str, Any], batch: int, size: int) -> BuiltModel:
    try:
        mod = importlib.import_module(path)
    except ImportError as e:
        raise TspipeError(
            f"model {spec!r}: cannot import {path!r} ({e}); hint: KIND is one of {', '.join(KINDS)}, or "
            "a module on PYTHONPATH"
        ) from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise TspipeError(f"model {spec!r}: {path} has no callable {name!r}")
    try:
        made = fn(**options)
    except TypeError as e:
        raise TspipeError(
            f"model {spec!r}: {name}(**{options}) failed: {e}; hint: --model-arg KEY=VALUE"
        ) from None
    if isinstance(made, nn.Module):
        return BuiltModel(spec, made, (_images(batch, size),))
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        return BuiltModel(spec, made[0], positional_args(made[1]))
    raise TspipeError(
        f"model {spec!r}: {name}() returned {type(made).__name__}; it must return an nn.Module or "
        "(module, example inputs)"
    )
