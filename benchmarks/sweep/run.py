"""Sweep: capture -> compile -> train -> equality with the reference, over real architectures.

Each model is built at a tiny size from its library (timm and torchvision without weights,
Hugging Face from a config), paired with a second instance of itself as a frozen KD teacher,
compiled into 2 stages (uniform costs: the sweep tests semantics, not speed), trained for 3
batches of 4 samples in 2 micro-batches under the ``tspipe`` schedule, and compared with the
:class:`~tspipe_fx.runtime.ReferenceTrainer` (plain PyTorch on the same micro-batches): every
loss and every student parameter and buffer afterwards.

    python benchmarks/sweep/run.py [--only NAME ...] [--markdown]

Prints one row per model (library, tracer, nodes, result, largest difference, seconds) and a
summary; the exit status is 1 if any model fails. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from typing import Any

import torch
from tabulate import tabulate
from torch.utils._pytree import tree_flatten, tree_map

import tspipe_fx
from tspipe_fx.cli.models import build_model
from tspipe_fx.runtime import ReferenceTrainer

IMG = {"image_size": 64}
VIT = {"img_size": 32, "patch_size": 8, "depth": 2}
# (name, spec, options, image size or None); HF text models get 16 tokens.
MODELS: list[tuple[str, str, dict[str, Any], int | None]] = [
    # timm convolutional networks
    ("resnet18", "timm:resnet18", {}, 64),
    ("resnet50d", "timm:resnet50d", {}, 64),
    ("resnext26ts", "timm:resnext26ts", {}, 64),
    ("seresnext26d", "timm:seresnext26d_32x4d", {}, 64),
    ("res2net50", "timm:res2net50_26w_4s", {}, 64),
    ("resnest14d", "timm:resnest14d", {}, 64),
    ("skresnet18", "timm:skresnet18", {}, 64),
    ("regnety_002", "timm:regnety_002", {}, 64),
    ("densenet121", "timm:densenet121", {}, 64),
    ("dla34", "timm:dla34", {}, 64),
    ("cspresnet50", "timm:cspresnet50", {}, 64),
    ("mobilenetv2", "timm:mobilenetv2_050", {}, 64),
    ("mobilenetv3", "timm:mobilenetv3_small_050", {}, 64),
    ("efficientnet_b0", "timm:efficientnet_b0", {}, 64),
    ("efficientnetv2", "timm:tf_efficientnetv2_b0", {}, 64),
    ("mnasnet", "timm:mnasnet_small", {}, 64),
    ("ghostnet", "timm:ghostnet_050", {}, 64),
    ("rexnet", "timm:rexnet_100", {}, 64),
    ("lcnet", "timm:lcnet_050", {}, 64),
    ("hrnet", "timm:hrnet_w18_small", {}, 64),
    ("ese_vovnet", "timm:ese_vovnet19b_dw", {}, 64),
    ("selecsls", "timm:selecsls42b", {}, 64),
    ("repvgg", "timm:repvgg_a0", {}, 64),
    ("nf_resnet", "timm:nf_resnet26", {}, 64),
    ("convnext", "timm:convnext_atto", {}, 64),
    ("convnextv2", "timm:convnextv2_atto", {}, 64),
    ("edgenext", "timm:edgenext_xx_small", {}, 64),
    ("mobilevit", "timm:mobilevit_xxs", {}, 64),
    ("fastvit", "timm:fastvit_t8", {}, 64),
    # timm transformers and MLPs
    ("vit", "timm:vit_tiny_patch16_224", VIT, 32),
    ("deit", "timm:deit_tiny_patch16_224", VIT, 32),
    ("eva02", "timm:eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, 28),
    ("cait", "timm:cait_xxs24_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    ("xcit", "timm:xcit_nano_12_p16_224", {"img_size": 32, "depth": 2}, 32),
    ("pit", "timm:pit_ti_224", {"img_size": 64}, 64),
    ("mixer", "timm:mixer_s16_224", {"img_size": 32}, 32),
    ("resmlp", "timm:resmlp_12_224", {"img_size": 32}, 32),
    ("swin", "timm:swin_tiny_patch4_window7_224",
     {"img_size": 32, "window_size": 2, "embed_dim": 24, "depths": (1, 1), "num_heads": (1, 2)}, 32),
    ("poolformer", "timm:poolformer_s12", {}, 64),
    ("levit", "timm:levit_128s", {}, 224),
    # torchvision
    ("tv_resnet18", "torchvision:resnet18", {}, 64),
    ("tv_mobilenet_v3", "torchvision:mobilenet_v3_small", {}, 64),
    ("tv_efficientnet", "torchvision:efficientnet_b0", {}, 64),
    ("tv_regnet", "torchvision:regnet_y_400mf", {}, 64),
    ("tv_shufflenet", "torchvision:shufflenet_v2_x0_5", {}, 64),
    ("tv_squeezenet", "torchvision:squeezenet1_1", {}, 64),
    ("tv_densenet", "torchvision:densenet121", {}, 64),
    ("tv_convnext", "torchvision:convnext_tiny", {}, 64),
    ("tv_googlenet", "torchvision:googlenet", {"aux_logits": False, "init_weights": False}, 64),
    ("tv_vit", "torchvision:vit_b_32", {"image_size": 64}, 64),
    ("tv_swin", "torchvision:swin_t", {}, 64),
]
TEXT = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 128}
LLAMA = {**TEXT, "num_key_value_heads": 1}
MODELS += [
    ("hf_bert", "hf:BertConfig:BertForMaskedLM", TEXT, None),
    ("hf_roberta", "hf:RobertaConfig:RobertaForMaskedLM", TEXT, None),
    ("hf_distilbert", "hf:DistilBertConfig:DistilBertForMaskedLM",
     {"n_layers": 2, "dim": 32, "n_heads": 2, "hidden_dim": 64, "vocab_size": 128}, None),
    ("hf_albert", "hf:AlbertConfig:AlbertForMaskedLM", {**TEXT, "embedding_size": 16}, None),
    ("hf_electra", "hf:ElectraConfig:ElectraForMaskedLM", {**TEXT, "embedding_size": 16}, None),
    ("hf_gpt2", "hf:GPT2Config:GPT2LMHeadModel", {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 128}, None),
    ("hf_llama", "hf:LlamaConfig:LlamaForCausalLM", LLAMA, None),
    ("hf_qwen2", "hf:Qwen2Config:Qwen2ForCausalLM", LLAMA, None),
    ("hf_mistral", "hf:MistralConfig:MistralForCausalLM", LLAMA, None),
    ("hf_gemma", "hf:GemmaConfig:GemmaForCausalLM", {**LLAMA, "head_dim": 16}, None),
    ("hf_phi", "hf:PhiConfig:PhiForCausalLM", TEXT, None),
    ("hf_opt", "hf:OPTConfig:OPTForCausalLM", {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                                              "ffn_dim": 64, "word_embed_proj_dim": 32, "vocab_size": 128}, None),
    ("hf_gpt_neox", "hf:GPTNeoXConfig:GPTNeoXForCausalLM", TEXT, None),
    ("hf_vit", "hf:ViTConfig:ViTForImageClassification",
     {**{k: TEXT[k] for k in TEXT if k != "vocab_size"}, "image_size": 32, "patch_size": 8}, 32),
    ("hf_convnext", "hf:ConvNextConfig:ConvNextForImageClassification",
     {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}, 64),
    ("hf_resnet", "hf:ResNetConfig:ResNetForImageClassification",
     {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "embedding_size": 16}, 64),
]


def _quiet(model: torch.nn.Module) -> torch.nn.Module:
    """Nothing random anywhere (dropout, stochastic depth, layer drop): the pipelined and the
    plain run must compute the same thing. Rates live in modules as floats (``self.dropout``,
    ``drop_rate``, ``drop_prob``) or as a dropout module's ``p``."""
    for m in model.modules():
        for key, value in list(vars(m).items()):
            if isinstance(value, float) and "drop" in key.lower():
                setattr(m, key, 0.0)
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) or type(m).__name__ == "StochasticDepth":
            m.p = 0.0
    config = getattr(model, "config", None)
    for key, value in list(vars(config).items()) if config is not None else []:
        if isinstance(value, float) and "drop" in key.lower():
            setattr(config, key, 0.0)
    return model


def _fresh(x: Any) -> Any:
    """Another batch like the example: new values, same shapes (token ids below the example's
    largest, an all-ones attention mask kept)."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_floating_point():
        return torch.randn_like(x)
    if bool((x == 1).all()):
        return x.clone()
    return torch.randint_like(x, 0, int(x.max()) + 1)


def _first(out: Any) -> torch.Tensor:
    return next(x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor) and x.is_floating_point())


def loss_fn(s: Any, t: Any, target: Any) -> torch.Tensor:
    return (_first(s) - _first(t)).square().mean()


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05)


def one(name: str, spec: str, options: dict[str, Any], size: int | None) -> dict[str, Any]:
    torch.manual_seed(0)
    built = build_model(spec, batch=4, options=dict(options), image_size=size, seq_len=16)
    student = _quiet(built.module)
    torch.manual_seed(1)
    teacher = _quiet(build_model(spec, batch=4, options=dict(options), image_size=size, seq_len=16).module).eval()
    home = copy.deepcopy(student)
    pipe = tspipe_fx.compile(home, copy.deepcopy(teacher), 2, example_inputs=built.args,
                             example_kwargs=built.kwargs or None, micro_batches=2, cost_model="uniform")  # fmt: skip
    trainer = pipe.trainer(loss_fn, optimizer=sgd)
    ref = ReferenceTrainer(student, teacher, loss_fn, optimizer=sgd, micro_batches=2)
    got, expected = [], []
    for step in range(3):
        torch.manual_seed(100 + step)
        inputs, kwargs = tree_map(_fresh, (built.args, built.kwargs))
        out = trainer.step(*inputs, **kwargs)
        got += [out.loss] if out is not None else []
        expected.append(ref.step(*inputs, **kwargs))
    got.append(trainer.finish().loss)
    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, expected, strict=True))
    trained = home.state_dict()
    worst, worst_name = 0.0, ""
    for key, value in student.state_dict().items():
        d = float((trained[key].double() - value.double()).abs().max()) if value.numel() else 0.0
        if d > worst:
            worst, worst_name = d, key
    ok = diff < 1e-4 and worst < 1e-4
    nodes = len(pipe.student.graph_module.graph.nodes)
    result = "equal" if ok else f"DIFFERS (loss {diff:.1e}, {worst_name} {worst:.1e})"
    return {"method": pipe.student.method, "nodes": nodes, "result": result, "loss": diff, "weights": worst, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names to run (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    rows, failed = [], 0
    for name, spec, options, size in MODELS:
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            r = one(name, spec, options, size)
        except Exception as e:  # noqa: BLE001 - one model's failure is a row of the table
            first = (str(e).strip().splitlines() or [""])[0][:160]
            r = {"method": "-", "nodes": "-", "result": f"FAILED: {type(e).__name__}: {first}", "loss": None,
                 "weights": None, "ok": False}
            traceback.print_exc(file=sys.stderr)
        failed += not r["ok"]
        rows.append([name, spec.split(":")[0], r["method"], r["nodes"], r["result"],
                     "-" if r["loss"] is None else f"{r['loss']:.1e}",
                     "-" if r["weights"] is None else f"{r['weights']:.1e}", f"{time.perf_counter() - start:.1f}"])
        print(" | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
    headers = ["model", "library", "tracer", "nodes", "result", "loss rel. diff", "weight max diff", "s"]
    print(tabulate(rows, headers=headers, tablefmt="github" if args.markdown else "simple"))
    print(f"\n{len(rows) - failed} of {len(rows)} models train equal to the reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
