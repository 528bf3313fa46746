"""`rlora compare --sets ... --tune ...` end to end on a tiny model (cells trained in this process): two data sets,
each tuned on a validation split carved from its training rows, its verdict cells trained with each arm's pick,
each set reported and then pooled; a re-run resumes every cell."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import run_config, write_tasks

pytestmark = pytest.mark.slow
RLORA = [sys.executable, "-m", "rlora.cli"]
ARGS = ["--local", "--methods", "lora,hydra", "--seeds", "1", "--n-boot", "100", "--sets", "alpha,beta",
        "--tune", "trainer.learning_rate=1e-3,5e-2", "--tune-steps", "2", "--val-rows", "6"]


def ids(path: Path) -> set:
    return {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}


def records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "cells").glob("*.json"))]


def run_log(folder: Path, rec: dict) -> str:
    return (folder / "runs" / rec["run_name"] / "logs" / "run.log").read_text()


def test_sets_tuned_reported_and_pooled_then_resumed(tiny_model_dir, tmp_path):
    root = tmp_path / "data"
    for k, name in enumerate(("alpha", "beta")):
        write_tasks(root / name, n_train=24, n_dev=8, seed=k)
    cfg = run_config(tiny_model_dir, root / "alpha", tmp_path, trainer__max_steps=3, trainer__save_steps=2,
                     eval__max_examples_per_task="null", diagnostics__enabled=False, ray__num_workers=1,
                     mlflow__tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", mlflow__log_system_metrics="false")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    out = tmp_path / "cmp"
    cmd = [*RLORA, "compare", str(cfg_path), "--out", str(out), *ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    # tuning cells train with seed 7 + 1000 (away from the verdict's seeds, 7 onwards)
    assert console.count("seed 1007 done: mean val accuracy") == 8
    assert console.count("seed 7 done: mean dev accuracy") == 4
    assert "seed 7 done: mean val" not in console and "seed 1007 done: mean dev" not in console

    pooled = json.loads((out / "pooled.json").read_text())
    assert pooled["sets"] == ["alpha", "beta"] and (out / "pooled.md").is_file()
    assert (out / "forest_pooled.png").read_bytes()[:4] == b"\x89PNG"
    line = pooled["comparisons"][0]
    assert line["label"] == "hydra vs lora (proportional)"
    for k, name in enumerate(("alpha", "beta")):
        folder = out / name
        report = json.loads((folder / "compare.json").read_text())
        assert (folder / "forest.png").is_file() and report["rng_seed"] == 7 + k
        # the set's line in the pooled report is the set's own macro-mean result (bootstrap seed 7 + k)
        own, mine = report["comparisons"][0]["mean"], line["pooled"]["sets"][name]
        assert (mine["diff"], mine["lo"], mine["hi"]) == (own["diff"], own["lo"], own["hi"])
        # the validation rows: carved from the training rows, disjoint from the dev rows and the rows trained on
        carved = out / "data" / f"{name}.val6-s7"
        for task in ("parity", "sign", "size"):
            val, train, dev = (ids(carved / task / f"{s}.jsonl") for s in ("val", "train", "dev"))
            assert len(val) == 6 and not val & dev and not val & train
            assert val | train == ids(root / name / task / "train.jsonl")
        # tuning: one 2-step cell per arm and candidate scored on the 6 validation rows of each task; the pick
        # is the best macro-mean validation accuracy (a tie: the first value)
        tuning = report["tuning"]
        assert (tuning["val_rows"], tuning["steps"], tuning["seed"]) == (6, 2, 1007)
        scores = {}
        for cand in ("trainer.learning_rate=1e-3", "trainer.learning_rate=5e-2"):
            for rec in records(folder / "tune" / cand):
                assert all(len(v) == 6 for v in rec["correct"].values())
                assert "step     2/2" in run_log(folder / "tune" / cand, rec)
                scores.setdefault(rec["method"], {})[cand] = sum(rec["accuracy"].values()) / len(rec["accuracy"])
        verdict = {r["method"]: r for r in records(folder)}
        for p in tuning["picks"]:
            assert p["scores"] == pytest.approx(scores[p["method"]])
            best = max(p["scores"].values())
            assert p["picked"] == next(c for c, v in p["scores"].items() if v == best)
            # the verdict cell trained with the pick on the carved training rows (72 - 3 x 6) and scored every dev row
            rec = verdict[p["method"]]
            assert rec["overrides"] == [p["picked"]] and all(len(v) == 8 for v in rec["correct"].values())
            log = run_log(folder, rec)
            lr = float(p["picked"].split("=")[1])
            assert "54 train rows" in log and f"lr {lr * 2 / 3:.2e}" in re.search(r"step +1/3.*", log).group(0)
        assert report["budget"]["mode"] == "ab" and report["budget"]["lora_rank"] == verdict["lora"]["rank"]
        assert "Tuning" in (folder / "compare.md").read_text() and "LoRA rank" in (folder / "compare.md").read_text()
    assert line["pooled"]["diff"] == pytest.approx(sum(s["diff"] for s in line["pooled"]["sets"].values()) / 2)
    # the pooled report is an MLflow run beside the sets' parent runs, naming them
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(json.loads((out / "pooled_state.json").read_text())["run_id"])
    assert run.info.run_name == "compare-pooled" and run.data.tags["sets"] == "alpha,beta"
    for name in ("alpha", "beta"):
        parent = json.loads((out / name / "compare_state.json").read_text())["parent_run_id"]
        assert run.data.tags[f"parent_run.{name}"] == parent
        assert run.data.metrics[f"diff/hydra-proportional_vs_lora-proportional/{name}"] == line["pooled"]["sets"][name]["diff"]
    assert run.data.metrics["diff/hydra-proportional_vs_lora-proportional/pooled"] == line["pooled"]["diff"]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier: skipped") == 12            # 2 sets x (4 tuning + 2 verdict) cells
    assert "compare: training" not in again.stdout + again.stderr
    assert json.loads((out / "pooled.json").read_text()) == pooled
