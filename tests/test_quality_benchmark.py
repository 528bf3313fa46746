"""benchmarks/quality.py, the wrapper over `rlora compare`, on another dataset (tiny random model:
mechanics only)."""
import json
import shutil
from pathlib import Path

import pytest

from helpers import load_benchmark, write_tasks

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def load_quality():
    return load_benchmark("quality")


@pytest.fixture
def two_unbalanced_tasks(tmp_path):
    root = write_tasks(tmp_path / "data")
    shutil.rmtree(root / "size")
    rows = (root / "sign" / "train.jsonl").read_text().splitlines()[:20]
    (root / "sign" / "train.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_quick_grid_on_another_dataset(tiny_model_dir, two_unbalanced_tasks, tmp_path, capsys):
    quality = load_quality()
    out, work = tmp_path / "results", tmp_path / "work"
    summary = quality.main(["--quick", "--json", "--data", str(two_unbalanced_tasks), "--model", str(tiny_model_dir),
                            "--out", str(out), "--work", str(work), "mlflow.enabled=false",
                            "ray.resources_per_worker={CPU: 1}"])
    assert summary["tasks"] == ["parity", "sign"]
    arms = {(a["method"], a["sampler"]) for a in summary["arms"]}
    best = max((a for a in summary["arms"] if a["sampler"] == "proportional"), key=lambda a: a["mean"])["method"]
    assert arms == {(m, "proportional") for m in quality.METHODS} | {(best, "dynamic")}
    assert all(a["n_seeds"] == 2 for a in summary["arms"])
    # 4 methods x 2 seeds + dynamic x 2 seeds, each trained once (the second grid reused the first's cells)
    assert len(list((work / "cells").glob("*.json"))) == 10
    labels = [c["label"] for c in summary["comparisons"]]
    assert "rlora vs lora (proportional)" in labels and f"dynamic vs proportional ({best})" in labels
    assert (out / "compare_quick.md").is_file() and (out / "compare_quick_forest.png").stat().st_size > 5_000
    assert json.loads((out / "compare_quick.json").read_text())["tasks"] == ["parity", "sign"]
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["benchmark"] == "quality"
    f = figures["figures"]["rlora_minus_lora_mean"]
    assert f["unit"] == "points" and f["interval"][0] <= f["value"] <= f["interval"][1] and f["spread"] >= 0
    assert f"dynamic_minus_proportional_worst_{best}" in figures["figures"]
    # the cells' records beside the report resume the grid in another work folder: nothing is trained again
    copied = sorted(p.name for p in (out / "compare_quick_cells").glob("*.json"))
    assert copied == sorted(p.name for p in (work / "cells").glob("*.json"))
    (tmp_path / "work2" / "cells").mkdir(parents=True)
    for name in copied:
        (tmp_path / "work2" / "cells" / name).write_bytes((out / "compare_quick_cells" / name).read_bytes())
    again = quality.main(["--quick", "--data", str(two_unbalanced_tasks), "--model", str(tiny_model_dir),
                          "--out", str(tmp_path / "results2"), "--work", str(tmp_path / "work2"), "mlflow.enabled=false",
                          "ray.resources_per_worker={CPU: 1}"])
    assert capsys.readouterr().out.count("finished earlier: skipped") == 8 + 10
    assert not (tmp_path / "work2" / "runs").exists()
    assert [a["mean"] for a in again["arms"]] == [a["mean"] for a in summary["arms"]]


def test_bad_data_dir_is_one_line_error(tmp_path):
    quality = load_quality()
    with pytest.raises(SystemExit) as err:
        quality.main(["--quick", "--data", str(tmp_path / "missing")])
    assert "--data" in str(err.value) and "\n" not in str(err.value)
