"""`rlora compare` end to end on a tiny model: cells through the real training loop (in this process and
on Ray Train), resume after the process is killed, pairing, the MLflow parent run with a child per cell."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import NOISE, run_config

pytestmark = pytest.mark.slow
RLORA = [sys.executable, "-m", "rlora.cli"]


def write_config(path: Path, model_dir, data_dir, out_dir, **overrides) -> Path:
    base = dict(trainer__max_steps=4, trainer__save_steps=2, eval__max_examples_per_task="null",
                diagnostics__enabled=False, adapter__dropout=0.1, ray__num_workers=1)
    base.update(overrides)
    cfg = run_config(model_dir, data_dir, out_dir, **base)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def compare(cfg_path, out, *args):
    return subprocess.run([*RLORA, "compare", str(cfg_path), "--out", str(out), *args], capture_output=True,
                          text=True, timeout=900)


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


def test_cells_resume_after_the_process_is_killed(tiny_model_dir, task_dir, tmp_path):
    """The fault hook kills the whole process (os._exit) at step 3 of each cell once: the first re-run
    resumes lora from its step-2 checkpoint, the second skips lora and resumes hydra; then the report."""
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, task_dir, tmp_path, trainer__fail_at_step=3,
                       mlflow__enabled="false")
    out = tmp_path / "cmp"
    args = ["--local", "--methods", "lora,hydra", "--seeds", "1", "--n-boot", "200"]
    first = compare(cfg, out, *args)
    assert first.returncode != 0 and not records(out)
    logs = "".join(p.read_text() for p in (out / "runs").glob("*/logs/run.log"))
    assert "fault injection: worker rank 0 exits at step 3" in logs
    second = compare(cfg, out, *args)
    assert second.returncode != 0 and [r["method"] for r in records(out)] == ["lora"]
    third = compare(cfg, out, *args)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "lora/proportional/seed 7 finished earlier: skipped" in third.stdout
    recs = {r["method"]: r for r in records(out)}
    assert set(recs) == {"lora", "hydra"}
    assert recs["lora"]["resumed_from_step"] == 2 and recs["hydra"]["resumed_from_step"] == 2
    assert (out / "compare.md").is_file() and (out / "forest.png").is_file()
    report = json.loads((out / "compare.json").read_text())
    assert [c["label"] for c in report["comparisons"]] == ["hydra vs lora (proportional)"]
    assert "hydra vs lora" in (out / "compare.md").read_text()


def test_ray_cells_are_paired_and_logged_as_mlflow_children(local_ray, tiny_model_dir, task_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from rlora.compare.runner import Comparison
    from rlora.config import load_config

    cfg_path = write_config(tmp_path / "c.yaml", tiny_model_dir, task_dir, tmp_path)
    out = tmp_path / "cmp"
    summary = Comparison(load_config(cfg_path), [("lora", "proportional"), ("mtl", "proportional")], 2, "lora", "ab", out,
                         n_boot=200).run()
    recs = records(out)
    assert len(recs) == 4
    # pairing: within a seed both methods trained on the same data order; seeds differ; same dev rows
    order = {(r["seed"], r["method"]): r["data_order"] for r in recs}
    assert order[(7, "lora")] == order[(7, "mtl")] and order[(8, "lora")] == order[(8, "mtl")]
    assert order[(7, "lora")] != order[(8, "lora")]
    assert all(r["row_ids"] == recs[0]["row_ids"] for r in recs)
    assert all(len(v) == 8 for v in recs[0]["correct"].values())  # every dev row of every task
    # equal A+B budget: lora's rank is chosen so that its A+B equals mtl's
    by = {r["method"]: r for r in recs}
    assert abs(by["lora"]["params"]["ab"] - by["mtl"]["params"]["ab"]) <= 0.1 * by["mtl"]["params"]["ab"]
    # MLflow: one parent run with the report, a child run per cell
    state = json.loads((out / "compare_state.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    parent = client.get_run(state["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_id for c in children) == sorted(r["mlflow_run_id"] for r in recs)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert {"compare/compare.md", "compare/compare.json", "compare/forest.png"} <= arts
    label = summary["comparisons"][0]
    assert label["label"] == "mtl vs lora (proportional)" and label["n_seeds"] == 2
    key = "diff/mtl-proportional_vs_lora-proportional/mean"
    assert parent.data.metrics[key] == pytest.approx(label["mean"]["diff"])


def test_ray_compare_console_shows_only_rlora_lines(tiny_model_dir, task_dir, tmp_path):
    """Without --verbose, `rlora compare` on its own Ray cluster shows rlora's lines only: worker and
    library output stays in the cells' log files (Ray used to forward it to the console); cells trained at
    once name themselves on each of their lines."""
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, task_dir, tmp_path, mlflow__enabled="false")
    out = tmp_path / "cmp"
    proc = compare(cfg, out, "--methods", "lora,hydra", "--seeds", "1", "--n-boot", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    noisy = [ln for ln in lines if any(re.search(p, ln) for p in NOISE) or "pid=" in ln]
    assert not noisy, noisy
    assert sorted(ln for ln in lines if "compare: training" in ln) == sorted(
        f"[rlora] compare: training {r['method']}/proportional/seed 7 ({r['run_name']})" for r in records(out))
    # the two cells ran at once (2 CPUs, 1 worker each): every line of a run names its cell
    labels = [f"{r['method']}/proportional/seed 7" for r in records(out)]
    run_lines = [ln for ln in lines if ln.startswith("[rlora] ") and not ln.startswith(("[rlora] compare", "[rlora]   "))]
    assert any(" | step " in ln for ln in run_lines), run_lines
    assert all(any(ln.startswith(f"[rlora] {lb} | ") for lb in labels) for ln in run_lines), run_lines
    for r in records(out):  # and the right one
        assert any(ln.startswith(f"[rlora] {r['method']}/proportional/seed 7 | run {r['run_name']}:")
                   for ln in run_lines), run_lines
    worker_logs = list((out / "runs").glob("*/logs/worker-0.log"))
    assert len(worker_logs) == 2 and all(p.stat().st_size > 0 for p in worker_logs)
    assert (out / "logs" / "compare.log").is_file()  # Ray's start-up lines (and cells run at once) go there


def test_samplers_and_baseline_choose_the_arms_and_the_comparisons(tiny_model_dir, task_dir, tmp_path):
    """`--samplers proportional,round_robin --baseline hydra`: a cell per (method, sampler); round-robin trains on
    another data order; every method is compared with hydra under each sampler, every sampler with proportional.
    A dotted override on the command line (`trainer.seed=11`, the file says 7) sets every cell's seed;
    `--n-boot 100` is the number of resamples behind the intervals (the report is recomputed from the cells
    with 100; on this tiny model the arms answer alike, so the intervals are [0, 0] whatever the number);
    `--budget total` gives LoRA the rank that matches all trainable parameters, not only A+B; `--verbose` puts
    the library lines on the console instead of the cells' log files."""
    from rlora.compare import summarize, to_json
    from rlora.compare.budget import lora_rank
    from rlora.config import load_config

    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, task_dir, tmp_path, mlflow__enabled="false")
    assert yaml.safe_load(cfg.read_text())["trainer"]["seed"] == 7
    out = tmp_path / "cmp"
    proc = compare(cfg, out, "--local", "--methods", "lora,hydra", "--samplers", "proportional,round_robin",
                   "--baseline", "hydra", "--seeds", "1", "--n-boot", "100", "--budget", "total", "--verbose",
                   "trainer.seed=11")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["seed"] for r in records(out)} == {11}
    multihead, loaded = ["hydra", "rlora", "mtl"], load_config(cfg)
    loaded.adapter.tasks = list(records(out)[0]["accuracy"])   # as the run fills them in from the data
    ranks = {r["method"]: r["rank"] for r in records(out)}
    assert ranks["lora"] == lora_rank(loaded, multihead, "total") != lora_rank(loaded, multihead, "ab")
    assert ranks["hydra"] == loaded.adapter.r
    library = [ln for ln in (proc.stdout + proc.stderr).splitlines()
               if ln.strip() and not ln.startswith(("[rlora]", "|"))]
    assert library and not list((out / "runs").glob("*/logs/run.log"))
    recs = {(r["method"], r["sampler"]): r for r in records(out)}
    assert set(recs) == {(m, s) for m in ("lora", "hydra") for s in ("proportional", "round_robin")}
    assert recs[("lora", "round_robin")]["data_order"] == recs[("hydra", "round_robin")]["data_order"]
    assert recs[("lora", "round_robin")]["data_order"] != recs[("lora", "proportional")]["data_order"]
    report = json.loads((out / "compare.json").read_text())
    assert [c["label"] for c in report["comparisons"]] == [
        "lora vs hydra (proportional)", "lora vs hydra (round_robin)",
        "round_robin vs proportional (lora)", "round_robin vs proportional (hydra)"]
    assert report["baseline"] == {"method": "hydra", "sampler": "proportional"}
    assert report["n_boot"] == 100 and "100 resamples" in (out / "compare.md").read_text()
    def by_label(comparisons):
        return {c["label"]: c for c in comparisons}

    again = to_json(summarize(records(out), "hydra", n_boot=100, seed=11))["comparisons"]
    assert by_label(again) == by_label(report["comparisons"])
