"""benchmarks/quality.py on another dataset directory and task count (tiny random model: mechanics only)."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from helpers import write_tasks

REPO = Path(__file__).resolve().parents[1]


def load_quality():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def two_unbalanced_tasks(tmp_path):
    """Two tasks of 48 and 20 training rows: every sampler draws differently from proportional."""
    root = write_tasks(tmp_path / "data")
    shutil.rmtree(root / "size")
    rows = (root / "sign" / "train.jsonl").read_text().splitlines()[:20]
    (root / "sign" / "train.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_quick_grid_on_another_dataset(tiny_model_dir, two_unbalanced_tasks, tmp_path, capsys):
    quality = load_quality()
    out = tmp_path / "results"
    report = quality.main(["--quick", "--json", "--threads", "1", "--data", str(two_unbalanced_tasks),
                           "--model", str(tiny_model_dir), "--out", str(out)])
    assert report["tasks"] == ["parity", "sign"] and report["task_sizes"] == [48, 20]
    # LoRA's rank is the nearest integer to the equal-A+B-budget rank (so the gap is rounding only), and the
    # counted parameters match the formula
    assert abs(report["budget_gap"]) <= 0.5 / (report["lora_rank"] - 0.5)
    for m in quality.METHODS:
        run = report["runs"][m]
        assert run["trainable_params"] == run["budget"]["total"]
        assert set(run["accuracy"]) == {"parity", "sign"} and all(n == 4 for n in run["n"].values())
    # unbalanced data: no sampler run is a replay of proportional's
    assert [s for s, r in report["sampler_runs"].items() if r.get("reused")] == ["proportional"]
    # diagnostics of every trained run: multi-head runs have head cosines, all have a 2 x 2 interference
    diag = report["runs"]["hydra"]["diagnostics"]
    assert diag["head_cos_BA"] is not None and diag["router_entropy"] is not None
    assert report["runs"]["lora"]["diagnostics"]["head_cos_BA"] is None
    assert report["runs"]["mtl"]["diagnostics"]["lambda_dev"] is not None
    assert all(len(r["diagnostics"]["interference"]) == 2 for r in report["runs"].values())
    # the three files, stamped, and the machine-readable last line
    md = (out / "quality_quick.md").read_text()
    assert "QUICK SMOKE RUN" in md and "| parity | sign |" in md and f"`{report['commit']}`" in md
    assert (out / "quality_quick.png").stat().st_size > 10_000
    assert json.loads((out / "quality_quick.json").read_text())["tasks"] == ["parity", "sign"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    assert figures["benchmark"] == "quality"
    assert {"rlora_minus_lora_mean", "mtl_minus_lora_mean", "dynamic_minus_proportional_worst",
            "full_grid_estimate_minutes"} <= set(figures["figures"])


def test_bad_data_dir_is_one_line_error(tmp_path):
    quality = load_quality()
    with pytest.raises(SystemExit) as err:
        quality.main(["--quick", "--data", str(tmp_path / "missing")])
    assert "--data" in str(err.value) and "\n" not in str(err.value)
