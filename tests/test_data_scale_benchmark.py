"""benchmarks/data_scale.py's mechanics on a few rows: the synthetic rows have the shipped rows' shape, and
the cold-build / tokenizer-alone ratio times a real cold build each round."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import data_scale  # noqa: E402


def test_synthetic_rows_are_shaped_like_the_shipped_ones(tmp_path):
    data_scale.write_data(tmp_path, rows=30, tasks=3, seed=1)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["task000", "task001", "task002"]
    for name in folders:
        rows = [json.loads(line) for line in open(tmp_path / name / "train.jsonl")]
        assert len(rows) == 10 and len({r["id"] for r in rows}) == 10
        assert all(r["task"] == name and r["target"] in r["options"] for r in rows)
        assert len(rows[0]["options"]) in (2, 3, 5) and all(r["options"] == rows[0]["options"] for r in rows)
        assert all(15 <= len(r["input"].split()) <= 100 for r in rows)
        assert len(open(tmp_path / name / "dev.jsonl").readlines()) == 2


def test_build_vs_tokenizer_builds_cold_every_round(tmp_path, tiny_model_dir, monkeypatch):
    from rlora.data import token_cache as tc
    from rlora.models import load_tokenizer

    monkeypatch.setenv("RLORA_TOKEN_CACHE", str(tmp_path / "tokens"))
    data_scale.write_data(tmp_path / "d", rows=40, tasks=2)
    cfg = data_scale.run_cfg(tmp_path / "d", tiny_model_dir, tmp_path / "out")
    builds = []
    real = tc.build
    monkeypatch.setattr(tc, "build", lambda *a, **k: (builds.append(1), real(*a, **k))[1])
    ratios = data_scale.build_vs_tokenizer(cfg, load_tokenizer(str(tiny_model_dir)), rounds=2)
    assert len(ratios) == 2 and all(r > 0 for r in ratios) and len(builds) == 2
    assert not [p for p in (tmp_path / "tokens").iterdir() if p.is_dir()]  # each round's build removed


def test_budget_lines_are_read_from_the_console():
    """The T = 200 figures come from the lines rlora train prints (rlora.tracking.probe_budget.ProbePlan.budget_line)."""
    from rlora.tracking.probe_budget import ProbePlan

    plan = ProbePlan(200)
    plan.record(pass_s=3.25, probe_s=2.0, probed=12)
    first = plan.budget_line(50, 12, 66, 2.0, 3.25, 0.1, 61.0, figures=False)
    plan.record(pass_s=4.0, probe_s=3.0, probed=9)
    last = plan.budget_line(60, 9, 36, 3.0, 4.0, 0.1, 74.5)
    console = "\n".join(["[rlora] step 50/60", first, "[rlora] step 60/60", last, "[rlora] checkpoint: step 60"])
    assert data_scale.read_budget_lines(console) == [
        {"step": 50, "probed": 12, "tasks": 200, "probe_s": 2.0, "pass_s": 3.2, "spent_s": 3.2, "train_s": 61.0},
        {"step": 60, "probed": 9, "tasks": 200, "probe_s": 3.0, "pass_s": 4.0, "spent_s": 7.2, "train_s": 74.5}]
