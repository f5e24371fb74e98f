"""Files written whole or not at all: plans and profiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tspipe_fx.files import write_text_atomic


def test_write_text_atomic_replaces_whole_and_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "sub" / "plan.json"
    write_text_atomic(target, "old")
    assert target.read_text() == "old"
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # plain data, not mkstemp's private mode

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"  # the old file, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["plan.json"]  # no temporary left


def test_plan_and_profile_save_through_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tspipe_fx.cost.profile
    import tspipe_fx.plan

    written: list[str] = []
    for module in (tspipe_fx.plan, tspipe_fx.cost.profile):
        monkeypatch.setattr(module, "write_text_atomic", lambda path, text: written.append(str(path)))
    tspipe_fx.plan.Plan.save(_Fake(), tmp_path / "a.json")  # type: ignore[arg-type]
    tspipe_fx.cost.profile.Profile.save(_Fake(), tmp_path / "b.json")  # type: ignore[arg-type]
    assert written == [str(tmp_path / "a.json"), str(tmp_path / "b.json")]


class _Fake:
    def to_json(self) -> str:
        return "{}"
