"""The MLflow record of a real training run (`rlora train --local` on the tiny model, a real sqlite
store), read back through MlflowClient as the run page reads it."""
import json
import os

import pytest
import yaml

from helpers import run_config
from rlora.config import validate_config
from rlora.tracking.mlflow_tracker import config_params

TASKS = ("parity", "sign", "size")


def _group(key: str) -> str:
    """How MLflow's run page sections charts: the name up to its last '/'."""
    return key.rsplit("/", 1)[0] if "/" in key else ""


@pytest.fixture(scope="module")
def record(tiny_model_dir, task_dir, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    from rlora.cli import main

    out = tmp_path_factory.mktemp("record")
    raw = run_config(tiny_model_dir, task_dir, out, trainer__run_name="rec", eval__before_training="true",
                     diagnostics__every_n_steps=3, ray__num_workers=1).model_dump(mode="json")
    raw["trainer"]["max_steps"] = 40  # the file says 40; the command line says 6
    src = out / "run.yaml"
    src.write_text("# a comment that is not part of the resolved config\n" + yaml.safe_dump(raw))
    old = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.5"
    try:
        assert main(["train", str(src), "trainer.max_steps=6", "--local"]) == 0
    finally:
        if old is None:
            os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
        else:
            os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = old
    uri = f"sqlite:///{out / 'mlflow.db'}"
    c = MlflowClient(uri)
    [run] = c.search_runs([c.get_experiment_by_name("tests").experiment_id])
    hist = {k: sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}
    return {"client": c, "run": run, "hist": hist, "out": out, "src": src,
            "dl": lambda p: c.download_artifacts(run.info.run_id, p, str(out / "dl"))}


def test_resolved_config_and_command_line_are_recorded(record):
    run, dl = record["run"], record["dl"]
    resolved = yaml.safe_load(open(dl("config.yaml")))
    cfg = validate_config(resolved)
    assert cfg.trainer.max_steps == 6 and cfg.trainer.output_dir == str(record["out"])  # not the file's 40
    assert cfg.adapter.tasks == list(TASKS) and cfg.trainer.run_name == "rec"
    # the resolved config is the run's config: the params MLflow shows are exactly its flattening
    assert config_params(cfg) == {k: v for k, v in run.data.params.items() if not k.startswith("data.truncated")}
    assert "# a comment" in open(dl("config_source.yaml")).read()
    assert run.data.tags["rlora.command"] == f"rlora train {record['src']} trainer.max_steps=6 --local"


def test_no_chart_is_all_zeros_and_truncation_is_a_param(record):
    hist, run = record["hist"], record["run"]
    # rlora's own keys; MLflow's system monitor may log one cpu_utilization sample of exactly 0 on a short,
    # loaded run (psutil's first reading), which says nothing about rlora's record
    zeros = [k for k, h in hist.items() if all(v == 0 for _, v in h) and not k.startswith("system/")]
    assert zeros == []
    assert not any(k.startswith("data/") for k in hist)
    assert {run.data.params[f"data.truncated_rows.{t}"] for t in TASKS} == {"0"}


def test_before_and_after_share_one_key_and_the_means_are_logged(record):
    hist, dl = record["hist"], record["dl"]
    results = json.load(open(dl("results.json")))
    for t in TASKS:
        assert [s for s, _ in hist[f"eval/accuracy/{t}"]] == [0, 6]
        assert hist[f"eval/accuracy/{t}"][0][1] == pytest.approx(results["results_before"][t]["accuracy"])
        assert hist[f"eval/accuracy/{t}"][1][1] == pytest.approx(results["results_after"][t]["accuracy"])
        assert hist[f"eval/loss/{t}"][1][1] == pytest.approx(results["results_after"][t]["loss"])
    mean_after = sum(results["results_after"][t]["accuracy"] for t in TASKS) / 3
    assert hist["eval/accuracy/mean"][-1] == (6, pytest.approx(mean_after))
    assert [s for s, _ in hist["eval/loss/mean"]] == [0, 6]


def test_metric_groups_are_few_and_name_no_task(record):
    groups = {_group(k) for k in record["hist"] if not k.startswith("system/")}
    assert not [g for g in groups if any(t in g.split("/") for t in TASKS)]
    assert {"eval/accuracy", "eval/loss", "train/loss", "sampler/p", "diag/router_usage"} <= groups
    assert len(groups) <= 20 and "diag" not in groups  # no one-chart section at the top of the page
    assert {f"diag/router_usage/{t}_head{i}" for t in TASKS for i in range(2)} <= set(record["hist"])


def test_task_weights_plot_has_one_point_per_logged_step(record):
    hist, dl = record["hist"], record["dl"]
    for step in (3, 6):
        plotted = json.load(open(dl(f"diagnostics/step_{step:06d}/task_weights.json")))
        logged = [s for s, _ in hist["sampler/p/parity"] if s <= step]
        assert [h["step"] for h in plotted["history"]] == logged == list(range(1, step + 1))
        assert plotted["history"][-1]["probabilities"][0] == pytest.approx(dict(hist["sampler/p/parity"])[step])


def test_head_similarity_grid_is_kept_as_data(record):
    data = json.load(open(record["dl"]("diagnostics/step_000006/head_similarity.json")))
    assert len(data) == 6  # 2 layers x q/v/down_proj
    [name] = [n for n in data if n.endswith("layers.0.self_attn.q_proj")]
    m = data[name]["BA"]
    assert len(m) == 2 and m[0][0] == pytest.approx(1.0)


def test_system_metrics_are_logged(record):
    assert "system/cpu_utilization_percentage" in record["hist"]
    assert "system/system_memory_usage_megabytes" in record["hist"]


@pytest.mark.parametrize("on", [True, False])
def test_system_metrics_can_be_turned_off(tmp_path, on):
    """`mlflow.log_system_metrics` decides whether rank 0 starts MLflow's system-metrics monitor on the run."""
    from types import SimpleNamespace

    from rlora.config import validate_config
    from rlora.tracking import mlflow_tracker as mt
    from rlora.train.loop import Trainer
    from rlora.train.runtime import LocalRuntime

    cfg = validate_config({"trainer": {"output_dir": str(tmp_path)}, "mlflow": {"log_system_metrics": on}})
    uri = mt.resolve(cfg)[0]
    run_id, _ = mt.start_or_resume_run(cfg, "sys")
    trainer = Trainer(cfg, LocalRuntime(None), {"run_name": "sys", "mlflow_run_id": run_id, "tracking_uri": uri})
    trainer.data = SimpleNamespace(truncated={"a": 0}, names=["a"])
    trainer.start_tracking()
    try:
        assert (getattr(trainer.tracker, "_monitor", None) is not None) == on
    finally:
        trainer.tracker.stop_system_metrics()
