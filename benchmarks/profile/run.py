"""Capture and profile full-size models on this machine; print time, node count and fidelity.

    python benchmarks/profile/run.py [--models resnet50 vit_b16 bert_base] [--batch 8] [--repeats 3]

Fidelity: sum of per-node forward+backward times / measured whole-model forward+backward time
(median of ``--repeats`` runs each); ``--save`` ships the profiles in ``tspipe_fx/profiles/cpu/``. Target (issue 2): capture+profile under 60 s per model on
a 2-core CPU, fidelity between 0.8 and 1.25.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate

import tspipe_fx
from tspipe_fx.cost import profiles
from tspipe_fx.report.profile import render_summary


def resnet50(batch: int) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    import torchvision

    return torchvision.models.resnet50(), (torch.randn(batch, 3, 224, 224),), {}


def vit_b16(batch: int) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False), (torch.randn(batch, 3, 224, 224),), {}


def bert_base(batch: int) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    from transformers import BertConfig, BertForMaskedLM

    ids = torch.randint(0, 30522, (batch, 128))
    return BertForMaskedLM(BertConfig()), (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


MODELS: dict[str, Callable[[int], tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]]] = {
    "resnet50": resnet50,
    "vit_b16": vit_b16,
    "bert_base": bert_base,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="write each profile to tspipe_fx/profiles/cpu/")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model, inputs, kwargs = MODELS[name](args.batch)
        t0 = time.perf_counter()
        captured = tspipe_fx.capture(model, inputs, example_kwargs=kwargs)
        t1 = time.perf_counter()
        prof = tspipe_fx.profile(captured, inputs, example_kwargs=kwargs, repeats=args.repeats)
        t2 = time.perf_counter()
        rows.append([
            name, captured.method, len(captured.graph_module.graph.nodes), t1 - t0, t2 - t1, t2 - t0,
            prof.model_fwd_ms, prof.model_fwd_bwd_ms, prof.fidelity_fwd, prof.fidelity_fwd_bwd,
        ])  # fmt: skip
        print(render_summary(prof), flush=True)
        if args.save:
            prof.save(profiles.path_of(f"cpu/{name}_b{args.batch}"))
    print()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, repeats {args.repeats}"
    )
    print(tabulate(rows, headers=["model", "tracer", "nodes", "capture s", "profile s", "total s", "fwd ms",
                                  "fwd+bwd ms", "fidelity fwd", "fidelity fwd+bwd"],
                   floatfmt=".2f", tablefmt="github"))  # fmt: skip


if __name__ == "__main__":
    main()
