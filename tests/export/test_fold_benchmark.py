"""benchmarks/export_fold.py on the tiny test adapters: every figure it prints is measured and finite."""
from __future__ import annotations

import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_export_fold_benchmark_measures_every_column(adapters, base_dir, data_dir):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import export_fold

    res = export_fold.measure(adapters["rlora"], data_dir, "beta", 2, str(base_dir))
    assert set(res) == {"fp32", "bf16 compact", "bf16 block", "bf16 floor", "rank", "block rank",
                        "dW bf16 compact", "dW bf16 block"}
    assert res["block rank"] == 8 and res["rank"] == 8
    for k in ("fp32", "bf16 compact", "bf16 block", "bf16 floor"):
        assert math.isfinite(res[k]) and res[k] > 0
    assert res["bf16 floor"] < res["bf16 compact"]                   # bf16 alone costs less than fold + bf16
    assert 0 < res["dW bf16 compact"] < 0.01                         # bf16 rounding of the factors: ~2^-8
    hydra = export_fold.measure(adapters["hydra"], data_dir, "beta", 2, str(base_dir))
    assert "bf16 block" not in hydra and hydra["rank"] == hydra["block rank"] == 4
