"""A 200-task run finishes with a bounded record: `rlora train --local`'s library path (run_training) on a tiny
random Llama, 200 synthetic tasks of a few rows, MTL-LoRA, diagnostics every 2 steps, MLflow in sqlite."""
import csv
import json
import re

import numpy as np
import pytest

from helpers import run_config

T = 200


def write_many(root, count):
    for t in range(count):
        d = root / f"t{t:03d}"
        d.mkdir(parents=True)
        for split, ids in (("train", range(4)), ("dev", range(4, 5))):
            with open(d / f"{split}.jsonl", "w") as fh:
                for i in ids:
                    n = 7 * t + i
                    fh.write(json.dumps({"task": d.name, "id": f"{d.name}-{i}", "input": f"Is {n} even or odd?",
                                         "options": ["even", "odd"], "target": "odd" if n % 2 else "even"}) + "\n")
    return root


@pytest.fixture(scope="module")
def many_tasks(tmp_path_factory):
    return write_many(tmp_path_factory.mktemp("many-tasks"), T)


@pytest.mark.parametrize("fraction,probed", [("null", 12), (0.05, 8)])
def test_max_time_fraction_sets_how_many_tasks_a_pass_probes(tiny_model_dir, tmp_path, fraction, probed):
    """12 tasks, one pass after 2 steps of a tiny model: 5 % of its training time affords the floor of 8 tasks
    (a pass costs more than that), no budget probes all 12."""
    from rlora.train.loop import Trainer
    from rlora.train.runtime import LocalRuntime

    cfg = run_config(tiny_model_dir, write_many(tmp_path / "data", 12), tmp_path / "out", trainer__max_steps=2,
                     diagnostics__every_n_steps=2, diagnostics__max_time_fraction=fraction, mlflow__enabled=False,
                     eval__max_examples_per_task=0)
    t = Trainer(cfg, LocalRuntime(None), {"run_name": "budget", "started_at": 0.0}, progress=False)
    t.fit()
    assert int(np.isfinite(np.diag(t._plan.latest)).sum()) == probed
    assert t._plan.passes == 1


def test_the_configured_time_fraction_reaches_the_probe_budget(tiny_model_dir, tmp_path, monkeypatch):
    """diagnostics.max_time_fraction is the fraction ProbePlan.choose budgets with (its effect on k, with fixed
    timings: tests/tracking/test_probe_budget.py::test_a_larger_time_fraction_probes_more_tasks)."""
    from rlora.tracking.probe_budget import ProbePlan
    from rlora.train.loop import Trainer
    from rlora.train.runtime import LocalRuntime

    seen, choose = [], ProbePlan.choose
    monkeypatch.setattr(ProbePlan, "choose", lambda self, fraction, *a: seen.append(fraction) or choose(self, fraction, *a))
    cfg = run_config(tiny_model_dir, write_many(tmp_path / "data", 12), tmp_path / "out", trainer__max_steps=4,
                     diagnostics__every_n_steps=2, diagnostics__max_time_fraction=0.37, mlflow__enabled=False,
                     eval__max_examples_per_task=0)
    Trainer(cfg, LocalRuntime(None), {"run_name": "fraction", "started_at": 0.0}, progress=False).fit()
    assert seen == [0.37, 0.37]


def test_the_probe_rotation_goes_on_after_a_resume(tiny_model_dir, tmp_path):
    """12 tasks, a tiny budget: the first run's pass (step 2) probes the floor of 8 and is checkpointed with the
    trainer state; the resumed run's pass (step 4) is its second, so no floor (the share is spent: no probe), and
    the sampler still gets the first run's 8-task matrix (before, the plan restarted: floor again, matrix lost)."""
    import json

    from rlora.train.loop import Trainer
    from rlora.train.runtime import LocalRuntime

    store = tmp_path / "store"
    data = write_many(tmp_path / "data", 12)

    def fit(steps):
        cfg = run_config(tiny_model_dir, data, tmp_path / "out", trainer__max_steps=steps, trainer__save_steps=2,
                         diagnostics__every_n_steps=2, diagnostics__max_time_fraction=1e-9, mlflow__enabled=False,
                         eval__max_examples_per_task=0, trainer__lr_scheduler_type="constant")
        t = Trainer(cfg, LocalRuntime(store), {"run_name": "rot", "started_at": 0.0, "storage_dir": str(store)},
                    progress=False)
        t.fit()
        return t

    first = fit(2)
    saved = json.loads((store / "checkpoint_000002" / "trainer_state.json").read_text())["probe_plan"]
    assert saved == first._plan.state_dict() and saved["passes"] == 1
    assert sum(v is not None for row in saved["latest"] for v in row) == 8 * 8
    again = fit(4)
    assert again.resumed_from == 2 and again._plan.passes == 2
    assert int(np.isfinite(again._plan.latest).sum()) == 8 * 8  # no new probe, the stored matrix kept
    assert again._plan.spent_s > first._plan.spent_s


def test_the_last_pass_plots_the_merged_matrix(tiny_model_dir, tmp_path):
    """12 tasks, a tiny budget: the step-2 pass probes the floor of 8 without figures, the last pass (step 4)
    probes none but draws the run's figures; its interference files show the stored 8-task matrix."""
    import csv as _csv

    from mlflow.tracking import MlflowClient

    from rlora.train.launcher import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = run_config(tiny_model_dir, write_many(tmp_path / "data", 12), tmp_path / "out", trainer__max_steps=4,
                     trainer__save_steps=100, diagnostics__every_n_steps=2, diagnostics__max_time_fraction=1e-9,
                     eval__max_examples_per_task=0, mlflow__tracking_uri=uri, trainer__run_name="last")
    result = run_training(cfg, local=True, verbose=False)
    client = MlflowClient(uri)
    arts = {s: [a.path.rsplit("/", 1)[1] for a in client.list_artifacts(result.mlflow_run_id, f"diagnostics/{s}")]
            for s in ("step_000002", "step_000004")}
    assert "interference.png" not in arts["step_000002"] and "interference.csv" in arts["step_000002"]
    assert "interference.png" in arts["step_000004"]
    got = client.download_artifacts(result.mlflow_run_id, "diagnostics/step_000004/interference.csv", str(tmp_path))
    first = client.download_artifacts(result.mlflow_run_id, "diagnostics/step_000002/interference.csv",
                                      str(tmp_path / "first"))
    rows = list(_csv.reader(open(got)))[1:]
    assert len(rows) == 8 * 7 // 2 and rows == list(_csv.reader(open(first)))[1:]


@pytest.mark.slow
def test_a_200_task_run_finishes_with_a_bounded_record(tiny_model_dir, many_tasks, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    from rlora.train.launcher import SUMMARY_EACH, results_table, run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = run_config(tiny_model_dir, many_tasks, tmp_path / "out", adapter__method="mtl", trainer__max_steps=4,
                     trainer__save_steps=100, trainer__logging_steps=2, diagnostics__every_n_steps=2,
                     eval__max_examples_per_task=1, mlflow__tracking_uri=uri, trainer__run_name="many")
    result = run_training(cfg, local=True, verbose=False)
    out = capfd.readouterr().out
    assert "method mtl, tasks t000 .. t199 (200 tasks); checkpoints in" in out  # the header names no 200 tasks
    client = MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    keys = set(run.data.metrics)
    families = {}
    for k in keys:
        families[k.rsplit("/", 1)[0]] = families.get(k.rsplit("/", 1)[0], 0) + 1
    assert len(keys) <= 2000
    assert max(families.values()) <= T + 1, families  # at most one key per task (+ the mean) in any family
    assert not [k for k in keys if "__" in k]  # no per-pair metric
    assert not [k for k in keys if re.search(r"mtl_mix/t\d+_head", k)]  # no per task x head metric
    top = sorted(k for k in keys if k.startswith("diag/interference/top/"))
    assert top == [f"diag/interference/top/{i:02d}" for i in range(1, 11)]

    # the budget: 10 % of the training time of 2 tiny steps (~0.05 s) affords less than a pass's fixed part:
    # the first pass probes the floor of 8 tasks and leaves its figures out, the second has no probe (its share
    # is spent) and draws the figures (the run has none yet). (≤ 10 % with realistic steps: data_scale.py)
    lines = [ln for ln in out.splitlines() if ln.startswith("[rlora] diagnostics step ")]
    assert [ln.split(":")[0] for ln in lines] == ["[rlora] diagnostics step 2", "[rlora] diagnostics step 4"]
    assert "probed 8/200 tasks (28 pairs)" in lines[0] and "without figures" in lines[0]
    assert ": no probe in 0.0s" in lines[1] and "without figures" not in lines[1]
    share = [float(re.search(r"= ([\d.]+)% of", ln).group(1)) for ln in lines]
    assert all(s > 10 and ln.endswith("(budget 10%, over)") for s, ln in zip(share, lines))
    names = {step: [a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(result.mlflow_run_id,
                                                                                f"diagnostics/step_{step:06d}")]
             for step in (2, 4)}
    assert "interference.csv" in names[2] and not [n for n in names[2] if n.endswith(".png")]
    assert "head_similarity.png" in names[4] and "interference.png" in names[4]  # the last pass: the merged matrix

    # the matrix is an artifact; the top slots name their pairs there
    art = client.download_artifacts(result.mlflow_run_id, "diagnostics/step_000002", str(tmp_path / "art"))
    pairs = list(csv.DictReader(open(f"{art}/interference.csv")))
    assert len(pairs) == 28 and len({r["task_a"] for r in pairs} | {r["task_b"] for r in pairs}) == 8
    slots = list(csv.DictReader(open(f"{art}/interference_top.csv")))
    lowest = sorted(float(r["cosine"]) for r in pairs)[:10]
    assert [float(r["cosine"]) for r in slots] == lowest
    hist = client.get_metric_history(run.info.run_id, top[0])
    assert [m.step for m in hist] == [2] and slots[0]["cosine"] == f"{hist[0].value:.6f}"

    # the console table is a summary; the whole one is in the run folder and in MLflow
    table = results_table(result.summary)
    rows = [ln for ln in table.splitlines() if re.match(r"\| t\d{3} ", ln)]
    assert len(rows) == 2 * SUMMARY_EACH and len(table.splitlines()) == 2 + 2 + 2 * SUMMARY_EACH + 1 + 1
    whole = (tmp_path / "out" / "many" / "results_table.md").read_text()
    assert sum(bool(re.match(r"\| t\d{3} ", ln)) for ln in whole.splitlines()) == T
    assert table.splitlines()[-1] == f"(all {T} tasks: {tmp_path / 'out' / 'many' / 'results_table.md'})"
    assert "results_table.md" in [a.path for a in client.list_artifacts(result.mlflow_run_id)]
