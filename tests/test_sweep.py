"""The architecture sweep (benchmarks/sweep/run.py) runs: a few of its models, one per tracer and
library, train equal to the reference; the whole sweep's table is benchmarks/README.md's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_the_sweep_runs_and_reports_equality() -> None:
    models = ["mobilenetv3", "swin", "tv_resnet18", "hf_llama"]
    done = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "sweep" / "run.py"), "--only", *models],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {
        line.split()[0]: line.split()
        for line in done.stdout.splitlines()
        if line.split()[:1] and line.split()[0] in models
    }
    assert {name: row[4] for name, row in rows.items()} == dict.fromkeys(models, "equal")
    assert rows["hf_llama"][2] == "export" and rows["swin"][2] == "fx"
    assert "4 of 4 models train equal to the reference" in done.stdout
