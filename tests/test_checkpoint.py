"""Checkpoints: one file per stage, written atomically; resuming continues the same run."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from toys import Net, Online, Target, byol_loss, kd_loss, sgd
from toys import run_batches as _run

import tspipe_fx


def test_checkpoint_resume_is_bit_identical(tmp_path: Any) -> None:
    from tspipe_fx.runtime.checkpoint import load_checkpoint, save_checkpoint, save_consolidated

    torch.manual_seed(0)
    online = Online()
    target = Target(online)
    data = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(6)]

    def trainer() -> Any:
        pipe = tspipe_fx.compile(copy.deepcopy(online), copy.deepcopy(target), 2, example_inputs=(torch.randn(8, 8),),
                                 mode="momentum", cost_model="uniform")  # fmt: skip
        opt = lambda ps: torch.optim.AdamW(ps, lr=1e-2)  # noqa: E731 - state to checkpoint
        sched = lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5)  # noqa: E731
        return pipe.trainer(byol_loss, optimizer=opt, lr_scheduler=sched, views=2, momentum=0.9)

    straight = trainer()
    all_losses = _run(straight, data)
    first = trainer()
    head = _run(first, data[:3])
    first.update_momentum(0.9)
    save_checkpoint(first, tmp_path / "ckpt")
    save_checkpoint(first, tmp_path / "ckpt")  # over an existing one
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "COMPLETE",
        "rng-0.pt",
        "stage-0.pt",
        "stage-1.pt",
        "trainer.pt",
    ]
    assert not (tmp_path / "ckpt.old").exists() and not (tmp_path / "ckpt.tmp").exists()
    second = trainer()
    load_checkpoint(second, tmp_path / "ckpt")
    tail = _run(second, data[3:])
    assert head + tail == all_losses  # bit-identical on CPU
    save_consolidated(second, tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert (
        saved["student"].keys() == online.state_dict().keys()
        and saved["teacher"].keys() == target.state_dict().keys()
    )


def test_a_crash_mid_save_leaves_the_previous_checkpoint(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tspipe_fx.runtime import checkpoint

    torch.manual_seed(0)
    pipe = tspipe_fx.compile(
        Net(), Net(32).eval(), 2, example_inputs=(torch.randn(8, 8),), cost_model="uniform"
    )
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    checkpoint.save_checkpoint(trainer, tmp_path / "ckpt")
    before = torch.load(tmp_path / "ckpt" / "stage-0.pt", weights_only=True)["student"]
    _run(trainer, [(torch.randn(8, 8), {"target": torch.randint(0, 4, (8,))})])
    real_replace = checkpoint.os.replace

    def crash(src: Any, dst: Any) -> None:
        if str(src).endswith("ckpt.tmp"):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        checkpoint.save_checkpoint(trainer, tmp_path / "ckpt")
    monkeypatch.undo()
    fresh = pipe.trainer(kd_loss, optimizer=sgd)
    checkpoint.load_checkpoint(fresh, tmp_path / "ckpt")  # falls back to ckpt.old, complete
    after = fresh.runtime.devices[0].student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
