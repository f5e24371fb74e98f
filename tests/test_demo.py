"""``make demo``: the digits distillation runs and reports what it promises."""

from __future__ import annotations

import re

import pytest

from tspipe_fx.cli import demo


def test_demo_distills_digits_through_the_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    demo.main(["--epochs", "4"])
    out = capsys.readouterr().out
    assert "1198 training and 599 test images of 8x8" in out
    assert "mode kd, 2 stages, batch 64 in 4 micro-batches" in out  # the partition report
    assert re.search(r"^dev0 \|.*\|$", out, flags=re.M) and re.search(r"^dev1 \|.*\|$", out, flags=re.M)
    assert re.search(r"samples/s through the pipeline; KD loss [\d.]+ -> [\d.]+", out)
    acc = {
        name: float(m)
        for name, m in re.findall(r"^(teacher|student alone|student distilled) .*?([\d.]+)$", out, flags=re.M)
    }
    assert set(acc) == {"teacher", "student alone", "student distilled"}
    # After four epochs every model is far above chance (10%): the distilled student's accuracy is
    # taken on the user's own module, so it is there only if the trained weights came home.
    assert all(v > 30 for v in acc.values()), acc
    assert acc["teacher"] >= max(acc["student alone"], acc["student distilled"]) - 1.0, acc
