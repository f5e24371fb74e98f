"""Checkpoints: one file per stage, written atomically; resuming continues the same run."""

from __future__ import annotations

import copy
import json
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
    save_checkpoint(first, tmp_path / "ckpt")  # over an existing one: a new generation, the old one gone
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "rng-0.g2.pt",
        "stage-0.g2.pt",
        "stage-1.g2.pt",
        "trainer.g2.pt",
        "tspipe-checkpoint.json",
    ]
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
    before = torch.load(tmp_path / "ckpt" / "stage-0.g1.pt", weights_only=True)["student"]
    _run(trainer, [(torch.randn(8, 8), {"target": torch.randint(0, 4, (8,))})])
    real_replace = checkpoint.os.replace

    def crash(src: Any, dst: Any) -> None:
        if str(dst).endswith(checkpoint.MANIFEST):  # the commit point of the second save
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        checkpoint.save_checkpoint(trainer, tmp_path / "ckpt")
    monkeypatch.undo()
    fresh = pipe.trainer(kd_loss, optimizer=sgd)
    checkpoint.load_checkpoint(fresh, tmp_path / "ckpt")  # the first save, whole
    after = fresh.runtime.devices[0].student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_checkpoint_touches_only_its_own_files(tmp_path: Any) -> None:
    """Issue 13.1: saving into results/ deleted the user's notes.txt and metrics.csv (the whole
    folder was swapped), and saving onto a file renamed it to *.old."""
    from tspipe_fx.runtime.checkpoint import MANIFEST, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    pipe = tspipe_fx.compile(Net(), Net(32).eval(), 2, example_inputs=(torch.randn(8, 8),), cost_model="uniform")
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    results = tmp_path / "results"
    (results / "plots").mkdir(parents=True)
    mine = {"notes.txt": "keep me", "metrics.csv": "step,loss\n", "stage-0.pt": "not a checkpoint", "plots/a.txt": "x"}
    for name, text in mine.items():
        (results / name).write_text(text)
    for _ in range(3):
        _run(trainer, [(torch.randn(8, 8), {"target": torch.randint(0, 4, (8,))})])
        save_checkpoint(trainer, results)
    assert all((results / name).read_text() == text for name, text in mine.items())
    assert json.loads((results / MANIFEST).read_text())["generation"] == 3
    assert not list(results.glob("*.g1.pt")) and not list(results.glob("*.g2.pt"))
    fresh = pipe.trainer(kd_loss, optimizer=sgd)
    load_checkpoint(fresh, results)
    assert fresh.next_index == trainer.next_index
    a_file = tmp_path / "model.bin"
    a_file.write_text("weights")
    with pytest.raises(tspipe_fx.TspipeError, match=r"model\.bin: it is a file, not a folder"):
        save_checkpoint(trainer, a_file)
    assert a_file.read_text() == "weights" and not (tmp_path / "model.bin.old").exists()


def test_loading_refuses_a_batch_in_flight_and_a_plan_cut_elsewhere(tmp_path: Any) -> None:
    """Issue 13.3 and 13.11: load_checkpoint with a batch in flight was accepted and the next
    step died with KeyError: 3; a checkpoint of other cuts failed with raw missing keys."""
    from tspipe_fx.runtime.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    x = (torch.randn(8, 8),)
    pipe = tspipe_fx.compile(Net(), Net(32).eval(), 2, example_inputs=x, cost_model="uniform")
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    save_checkpoint(trainer, tmp_path / "ckpt")
    trainer.step(torch.randn(8, 8), target=torch.randint(0, 4, (8,)))
    with pytest.raises(tspipe_fx.TspipeError, match=r"batch 0 is still in flight.*call finish\(\) first"):
        load_checkpoint(trainer, tmp_path / "ckpt")
    n = len(pipe.student_chain.candidates)
    other = tspipe_fx.compile(Net(), Net(32).eval(), 2, example_inputs=x, cost_model="uniform",
                              balance=([1, pipe.student_chain.n - 1], [pipe.teacher_chain.n - 1, 1]))  # fmt: skip
    assert n and other.plan.student.cuts != pipe.plan.student.cuts
    with pytest.raises(tspipe_fx.TspipeError, match=r"saved from a plan cut at .* this trainer's plan is cut at"):
        load_checkpoint(other.trainer(kd_loss, optimizer=sgd), tmp_path / "ckpt")
    with pytest.raises(tspipe_fx.TspipeError, match="no complete checkpoint at"):
        load_checkpoint(pipe.trainer(kd_loss, optimizer=sgd), tmp_path / "nothing")


def test_a_checkpoint_of_the_earlier_layout_still_loads(tmp_path: Any) -> None:
    """Before generations a checkpoint was stage-J.pt, rng-R.pt, trainer.pt and COMPLETE."""
    from tspipe_fx.runtime.checkpoint import MANIFEST, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    pipe = tspipe_fx.compile(Net(), Net(32).eval(), 2, example_inputs=(torch.randn(8, 8),), cost_model="uniform")
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    _run(trainer, [(torch.randn(8, 8), {"target": torch.randint(0, 4, (8,))})] * 2)
    save_checkpoint(trainer, tmp_path / "ckpt")
    folder = tmp_path / "ckpt"
    for path in folder.glob("*.g1.pt"):
        path.rename(folder / path.name.replace(".g1", ""))
    meta = torch.load(folder / "trainer.pt", weights_only=True)
    torch.save({**meta, "stages": 2}, folder / "trainer.pt")
    (folder / MANIFEST).unlink()
    (folder / "COMPLETE").write_text("ok\n")
    fresh = pipe.trainer(kd_loss, optimizer=sgd)
    load_checkpoint(fresh, folder)
    assert fresh.next_index == 2
    expected = trainer.runtime.devices[1].student.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in fresh.runtime.devices[1].student.state_dict().items())


def test_a_checkpoint_into_the_working_folder(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13.11: ``save_checkpoint(tr, ".")`` once swapped the whole working folder."""
    from tspipe_fx.runtime.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("# the user's script\n")
    torch.manual_seed(0)
    pipe = tspipe_fx.compile(Net(), Net(32).eval(), 2, example_inputs=(torch.randn(8, 8),), cost_model="uniform")
    trainer = pipe.trainer(kd_loss, optimizer=sgd)
    _run(trainer, [(torch.randn(8, 8), {"target": torch.randint(0, 4, (8,))}) for _ in range(2)])
    save_checkpoint(trainer, ".")
    assert (tmp_path / "train.py").read_text() == "# the user's script\n"
    assert (tmp_path / "tspipe-checkpoint.json").is_file()
    other = pipe.trainer(kd_loss, optimizer=sgd)
    load_checkpoint(other, ".")
    assert other.next_index == trainer.next_index
