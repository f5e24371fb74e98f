"""Checkpoints of a trainer: one file per stage, written atomically, loaded with ``weights_only``.

Layout of a checkpoint directory::

    stage-0.pt ... stage-{N-1}.pt   student and teacher stage weights, optimizer, LR scheduler
    trainer.pt                      batch counter, EMA momentum, RNG states
    COMPLETE                        written last

A save goes to ``DIR.tmp`` first and is renamed into place; the previous checkpoint survives as
``DIR.old`` until the new one is complete, so a crash leaves one whole checkpoint, never half
of one. :func:`load_checkpoint` reads ``DIR`` (or ``DIR.old`` after such a crash).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tspipe_fx.errors import TspipeError

__all__ = ["load_checkpoint", "save_checkpoint", "save_consolidated"]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(trainer: Any, directory: str | os.PathLike[str]) -> Path:
    """Write ``trainer``'s full state (call ``finish()`` first: nothing may be in flight)."""
    state = trainer.state_dict()
    final = Path(directory)
    staging = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for j in range(len(state["student"])):
        _atomic_save(
            {k: state[k][j] for k in ("student", "teacher", "optimizers", "schedulers", "teacher_prev")},
            staging / f"stage-{j}.pt",
        )
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    _atomic_save({"momentum": state["momentum"], "next_index": state["next_index"], "stages": len(state["student"]),
                  "rng": rng}, staging / "trainer.pt")  # fmt: skip
    (staging / "COMPLETE").write_text("ok\n")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(trainer: Any, directory: str | os.PathLike[str]) -> None:
    """Restore a checkpoint written by :func:`save_checkpoint` into a trainer of the same plan."""
    path = Path(directory)
    if not (path / "COMPLETE").exists():
        old = path.with_name(path.name + ".old")
        if (old / "COMPLETE").exists():
            path = old  # a save crashed after moving the previous checkpoint aside
        else:
            raise TspipeError(f"no complete checkpoint at {path}; hint: the directory save_checkpoint wrote")
    meta = torch.load(path / "trainer.pt", weights_only=True)
    if meta["stages"] != len(trainer.runtime.devices):
        raise TspipeError(
            f"the checkpoint has {meta['stages']} stages, the trainer {len(trainer.runtime.devices)}"
        )
    stages = [torch.load(path / f"stage-{j}.pt", weights_only=True) for j in range(meta["stages"])]
    trainer.load_state_dict(
        {
            **{
                k: [s[k] for s in stages]
                for k in ("student", "teacher", "optimizers", "schedulers", "teacher_prev")
            },
            "momentum": meta["momentum"],
            "next_index": meta["next_index"],
        }
    )
    torch.set_rng_state(meta["rng"]["cpu"])
    if "cuda" in meta["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(meta["rng"]["cuda"]))


def save_consolidated(trainer: Any, path: str | os.PathLike[str]) -> None:
    """The user's original student and teacher state_dicts, for use outside tspipe_fx."""
    trainer.sync_to_modules()
    student, teacher = trainer.pipe.student_module, trainer.pipe.teacher_module
    if student is None or teacher is None:
        raise TspipeError(
            "save_consolidated needs the original modules: compile the nn.Modules, not captured ones"
        )
    _atomic_save({"student": student.state_dict(), "teacher": teacher.state_dict()}, Path(path))
