"""The scripts in examples/ run and print what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_cost_model_example_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cost_model.py"), "--batch", "2", "--image", "32"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert "resnet18, micro-batch 1 (profiled at batch 2)" in out
    assert "measured x1.1 + overhead fwd+bwd ms" in out
    assert any(line.startswith("layer3") for line in out.splitlines())
