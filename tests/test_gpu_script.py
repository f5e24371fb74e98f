"""The GPU script (benchmarks/gpu/run.py) runs end to end in its CPU smoke mode (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_gpu_script_smoke(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "run.py"), "--out", str(tmp_path), "--smoke"],
                   check=True, capture_output=True, text=True, timeout=600)  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["profiles"]) == {"resnet18", "vit_s16", "distilbert"}
    assert len(results["stage_fidelity"]["vit_s16->resnet18"]) == 4
    rows = results["schedule_equality"]  # every schedule of issue 14 against the reference, on the CPU
    assert {"tspipe", "gpipe", "1f1b", "momentum auto, 2 stages per device"} <= set(rows)
    assert any(r["split_backward"] for r in rows.values())
    for name, r in rows.items():  # fp32 rounding (terms summed in another order), not bits
        assert r["loss_max_rel_diff"] < 1e-5 and r["param_max_abs_diff"] < 1e-3, name
    assert rows["tspipe"]["param_max_abs_diff"] == rows["gpipe"]["param_max_abs_diff"] == 0.0
    assert set(results["micro_batch_scaling"]) == {"2", "4"}
    assert (tmp_path / "profiles.tar.gz").stat().st_size > 1000
    assert set(results["training"]) == {"fp32", "bf16", "fp32-recompute"}  # no compiles in smoke mode
    assert set(results["memory"]) == {"fp32", "recompute", "bf16"}  # predicted only, on a CPU
    assert results["memory"]["recompute"]["predicted_mib"] < results["memory"]["fp32"]["predicted_mib"]
    assert not results["errors"]
