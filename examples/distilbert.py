"""DistilBERT-style masked-LM distillation, the TSPipe paper's NLP workload: a BERT-large teacher,
a DistilBERT-large student (the teacher's width, half its layers), and the full distiller loss:

    L = alpha_ce * T^2 * KL(teacher_T || student_T)    over the tokens the attention mask keeps
      + alpha_mlm * CE(student logits, masked-LM labels)
      + alpha_cos * (1 - cos(student last hidden state, teacher last hidden state))

The cosine term reaches back through every student stage: its gradient flows into the hidden
states the last stage returns.

    python examples/distilbert.py                                    # tiny configs, 2 CPU stages
    torchrun --nproc-per-node 2 examples/distilbert.py --runtime dist
    torchrun --nproc-per-node 8 examples/distilbert.py --runtime dist --full --gpus 8

Models come from their configs (``BertConfig``, ``DistilBertConfig``): nothing is downloaded.
Synthetic token ids, 15% of them masked as the labels.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from _common import compile_pair, finish_args, parser, train
from torch import nn


def models(full: bool) -> tuple[nn.Module, nn.Module]:
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    if full:  # BERT-large, and a DistilBERT of its width with half its layers
        t_cfg = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        s_cfg = DistilBertConfig(dim=1024, n_layers=12, n_heads=16, hidden_dim=4096)
    else:
        t_cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)  # fmt: skip
        s_cfg = DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                 max_position_embeddings=64)  # fmt: skip
    for cfg in (t_cfg, s_cfg):
        cfg.output_hidden_states = True
        cfg.attn_implementation = "eager"
    return DistilBertForMaskedLM(s_cfg), BertForMaskedLM(t_cfg).eval()


def distiller_loss(temperature: float, alpha_ce: float, alpha_mlm: float, alpha_cos: float):  # type: ignore[no-untyped-def]
    def loss(s: Any, t: Any, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, mask = target
        keep = mask.bool()
        s_logits, t_logits = s.logits[keep], t.logits[keep]  # (tokens, vocab)
        ce = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.softmax(t_logits / temperature, -1),
                      reduction="batchmean") * temperature**2  # fmt: skip
        mlm = F.cross_entropy(s.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        s_h, t_h = s.hidden_states[-1][keep], t.hidden_states[-1][keep]  # (tokens, dim)
        cos = F.cosine_embedding_loss(s_h, t_h, torch.ones(len(s_h), device=s_h.device))
        return alpha_ce * ce + alpha_mlm * mlm + alpha_cos * cos

    return loss


def batch(n: int, seq: int, vocab: int, g: torch.Generator) -> tuple[dict[str, torch.Tensor], Any]:
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[:, seq - seq // 4 :] = 0  # padding at the end of every sequence
    masked = (torch.rand(n, seq, generator=g) < 0.15) & mask.bool()
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    ids = torch.where(masked, torch.full_like(ids, 4), ids)  # the [MASK] token
    return {"input_ids": ids, "attention_mask": mask}, (labels, mask)


def main() -> None:
    p = parser(__doc__, batch=8, full_batch=128)
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (16 tiny, 128 full)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha-ce", type=float, default=5.0)
    p.add_argument("--alpha-mlm", type=float, default=2.0)
    p.add_argument("--alpha-cos", type=float, default=1.0)
    args = finish_args(p.parse_args())
    student, teacher = models(args.full)
    seq = args.seq or (128 if args.full else 16)
    inputs, target = batch(args.batch, seq, student.config.vocab_size, torch.Generator().manual_seed(args.seed))
    pipe = compile_pair(student, teacher, args, inputs)
    lr = args.lr or (5e-4 if args.full else 1e-2)
    loss = distiller_loss(args.temperature, args.alpha_ce, args.alpha_mlm, args.alpha_cos)
    trainer = pipe.trainer(loss, runtime=args.runtime, optimizer=lambda ps: torch.optim.AdamW(ps, lr=lr))
    train(trainer, itertools.repeat(((), inputs, target)), args.steps)


if __name__ == "__main__":
    main()
