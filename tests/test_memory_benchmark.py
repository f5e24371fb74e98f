"""The memory benchmark (benchmarks/memory/run.py): each torchrun rank's measured peak within the
issue's 15% of the plan's prediction (slow: two ranks train; its figures are
benchmarks/README.md's). Three steps: the pipeline runs a batch behind, and the optimizer's state
exists from the first step on, so the second window is the first in steady state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("case", ["1f1b", "1f1b-except-last"])
def test_prediction_within_15_percent_of_the_measured_peak(tmp_path: Path, case: str) -> None:
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory" / "run.py"), "--only", case, "--steps", "3",
                    "--json", str(out)], check=True, capture_output=True, text=True, timeout=900)  # fmt: skip
    figures = json.loads(out.read_text())
    assert set(figures) == {f"{case}/0", f"{case}/1"}
    for stage, f in figures.items():
        assert abs(f["predicted"] / f["measured"] - 1) < 0.15, (stage, f)
